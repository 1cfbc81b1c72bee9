"""Packaging: one import package `lighttransfer`, a console script, and a CLI that starts without torch."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO


def test_wheel_holds_one_package(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(REPO)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("lighttransfer-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert all(t == "lighttransfer" or t.endswith(".dist-info") for t in top), top
    for sub in ("calibration", "analysis", "convert", "kernels", "runtime", "bench", "serving", "serving/vllm"):
        assert f"lighttransfer/{sub}/__init__.py" in names
    assert "lighttransfer/calibration/data/sense_and_sensibility.txt" in names
    assert not any(n.startswith("lighttransfer/tests/") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    entry_text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "lighttransfer = lighttransfer.cli:main" in entry_text
    # vLLM finds the serving plugin through this group (only when vLLM is installed does anything load it)
    assert "[vllm.general_plugins]\nlighttransfer = lighttransfer.serving.vllm:register" in entry_text


def test_help_does_not_import_torch():
    code = "import sys; from lighttransfer.cli import main; sys.argv=['lighttransfer','--help']\n" \
           "try:\n    main()\nexcept SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for cmd in ("analyze", "convert", "inspect", "generate", "eval", "bench"):
        assert cmd in proc.stdout


def test_checkout_script_runs_cli(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bin" / "lighttransfer"), "--version"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and "lighttransfer, version" in proc.stdout


def test_top_level_names_are_not_importable_alone(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import analysis"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "No module named 'analysis'" in proc.stderr
    assert Path(REPO / "analysis" / "__init__.py").is_file()


def test_checkout_root_on_sys_path_does_not_break_transformers():
    # `python -c` run in the checkout puts its root first on sys.path, where the folder kernels/ shadows the
    # name of the hub's unrelated package, which transformers imports where it is installed (a dependency since
    # 5.25): that package then gets the name, and where it is missing transformers finds no version
    code = ("import os\n"
            "from transformers.utils import is_kernels_available\n"
            "import transformers.activations\n"
            "import kernels\n"
            "mine = os.path.abspath(kernels.__file__).startswith(os.path.abspath('kernels') + os.sep)\n"
            "assert mine != is_kernels_available(), (kernels.__file__, is_kernels_available())\n"
            "import lighttransfer.kernels as k\nassert callable(k.streaming_attention)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-1500:]


def test_public_functions_are_not_shadowed_by_submodules():
    # importing a submodule binds it on its package: a public function of the same name would be replaced
    import importlib
    import pkgutil
    import types

    import lighttransfer

    packages = [importlib.import_module(f"lighttransfer.{m}")
                for m in ("analysis", "calibration", "convert", "kernels", "runtime", "bench")]
    for package in packages:
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.endswith(("_triton", "_bench")):
                importlib.import_module(f"{package.__name__}.{info.name}")
    for package in [lighttransfer, *packages]:
        for name in getattr(package, "__all__", []):
            if name != "__version__":
                assert not isinstance(getattr(package, name), types.ModuleType), f"{package.__name__}.{name}"
