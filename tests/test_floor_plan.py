"""The floor plan: data flows one way (calibration -> analysis -> convert -> runtime | serving -> training, evaluation,
bench), and the imports follow it. A stage imports the ground floor and the stages before it, never one after it,
never the CLI; the ground floor imports no stage. Every import counts, also those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# what several stages share and none owns
GROUND = {"errors", "lazy_exports", "compat", "architecture", "output_files", "environment", "hybrid_format",
          "fingerprint", "weight_files",
          "kernels", "loading", "gguf_metadata", "demo_model", "__init__"}
# each stage, and the stages it may import besides the ground floor
STAGES = {
    "calibration": set(),
    "analysis": {"calibration"},
    "convert": {"calibration", "analysis"},
    "runtime": {"calibration"},  # reads the checkpoint format from the ground floor, not from convert
    # fine-tunes a converted checkpoint into a new one: reads text like the calibration, layouts like the runtime,
    # and writes through convert's staging
    "training": {"calibration", "analysis", "convert", "runtime"},
    "evaluation": {"calibration", "analysis", "convert", "runtime"},
    "bench": {"calibration", "analysis", "convert", "runtime"},
    # engines other than our runtime (the vLLM plugin): they read the checkpoint format from the ground floor,
    # like the runtime, and import no stage
    "serving": set(),
}
ROOF = "cli"


def _top(path: Path) -> str:
    rel = path.relative_to(REPO)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> set[str]:
    """Top-level lighttransfer modules that ``path`` imports (relative or absolute, at any depth)."""
    rel = path.relative_to(REPO)
    package = list(rel.parts[:-1])  # the module's package, inside lighttransfer
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                parts = base + (node.module.split(".") if node.module else [])
                if parts:
                    found.add(parts[0])
                else:  # `from .. import x` at the root: x is a top-level module
                    found.update(alias.name for alias in node.names)
            elif node.module and node.module.split(".")[0] == "lighttransfer":
                parts = node.module.split(".")[1:]
                found.update([parts[0]] if parts else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "lighttransfer" and len(parts) > 1:
                    found.add(parts[1])
    return found


def _package_files():
    tops = GROUND | set(STAGES) | {ROOF}
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[0] in {"tests", ".venv", ".venv-vllm", ".cache", "build"} or rel.parts[:2] == ("bench", "scripts"):
            continue
        if _top(path) in tops or (len(rel.parts) == 1 and rel.stem in tops):
            yield path


def _violations() -> list[str]:
    bad = []
    for path in _package_files():
        here = _top(path)
        allowed = GROUND | STAGES.get(here, set()) | {here}
        if here == ROOF:
            continue
        if here in GROUND and here != "__init__":
            allowed = GROUND
        for target in _imports(path) - {"__version__"}:
            if target not in allowed:
                bad.append(f"{path.relative_to(REPO)} imports {target}")
    return bad


def test_every_import_follows_the_flow():
    assert _violations() == []


def test_the_check_sees_a_back_edge(tmp_path, monkeypatch):
    """The checker itself: a runtime module that imports convert, and a stage that imports the CLI, are caught."""
    fake_repo = tmp_path / "repo"
    (fake_repo / "runtime").mkdir(parents=True)
    (fake_repo / "runtime" / "bad.py").write_text("from ..convert.plan import pick_layers\n")
    (fake_repo / "analysis").mkdir()
    (fake_repo / "analysis" / "worse.py").write_text("def f():\n    from lighttransfer.cli import main\n")
    (fake_repo / "kernels").mkdir()
    (fake_repo / "kernels" / "up.py").write_text("from ..runtime import load\n")
    monkeypatch.setattr(__import__(__name__), "REPO", fake_repo)
    assert sorted(_violations()) == ["analysis/worse.py imports cli", "kernels/up.py imports runtime",
                                     "runtime/bad.py imports convert"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_is_a_package_here(stage):
    assert (REPO / stage / "__init__.py").is_file()
