"""The multi-GPU analysis script: its layer placement, and a miniature run on the CPU whose two placements give
the same report (the GPU run compares one GPU against several the same way)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "scripts" / "analyze_multi_gpu.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("analyze_multi_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_layers_split_into_contiguous_equal_runs(script):
    assert script.layer_devices(4, ["a", "b"]) == ["a", "a", "b", "b"]
    assert script.layer_devices(5, ["a", "b"]) == ["a", "a", "a", "b", "b"]
    placed = script.device_map_for(80, ["cuda:0", "cuda:1"])
    assert placed["model.embed_tokens"] == "cuda:0" and placed["lm_head"] == placed["model.norm"] == "cuda:1"
    assert [placed[f"model.layers.{i}"] for i in (0, 39, 40, 79)] == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]


def test_tiny_run_writes_both_placements_and_their_difference(script, tmp_path):
    pytest.importorskip("accelerate")
    out = tmp_path / "amg.json"
    script.main([str(out), "--tiny", "--seq-len", "256", "--samples", "2", "--window", "32", "--last", "4"])
    got = json.loads(out.read_text())
    assert set(got["placements"]) == {"single", "auto"}
    assert got["difference_auto_vs_single"] == {"layer_lazy_ratio": 0.0, "kv_head_lazy_ratio": 0.0,
                                                "same_ranking": True}
    ratios = got["placements"]["auto"]["layer_lazy_ratios"]
    assert len(ratios) == got["shape"]["num_hidden_layers"] and all(0.0 < r <= 1.0 for r in ratios)
