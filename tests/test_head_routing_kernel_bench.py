"""The head routing kernel bench at small shapes in the interpreter: every fused column checked against the
reference (decision, moments, outputs) before it is timed, the balanced column among them."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "scripts" / "head_routing_kernel_bench.py"


def test_the_bench_checks_and_times_the_three_launch_and_balanced_steps():
    if not os.environ.get("TRITON_INTERPRET"):
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1, set by conftest on CPU machines)")
    spec = importlib.util.spec_from_file_location("head_routing_kernel_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = bench.bench_batch(2, heads=4, kv_heads=2, head_dim=32, n_keys=600, sink=4, window=100,  # as --tiny
                            dtype=torch.float32, device="cpu", graph=False, rounds=1, tolerance=1e-4,
                            variants=("fused", "fusedb"), fused_diagonal=False)
    for share in bench.SHARES:
        assert row["errors"][f"fusedb@{share:g}"] < 1e-4 and row["errors"][f"fused@{share:g}"] < 1e-4
        assert row["us_eager"][f"fusedb@{share:g}"] > 0
    md = bench.markdown({"environment": {}, "pinned_configs": True, "shape": "tiny", "poll_keys": None,
                         "fused_moments": "full", "balanced_per_sm": None, "rows": [row]})
    assert "| 2 | fusedb (balanced) |" in md and "| 2 | fused (three-launch) |" in md
