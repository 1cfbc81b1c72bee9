"""The sparse prefill benchmark script runs end to end at its tiny CPU shape, and its Flex baseline is exact."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "scripts" / "sparse_prefill_bench.py"


def _script():
    spec = importlib.util.spec_from_file_location("sparse_prefill_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flex_baseline_computes_the_same_blocks():
    from lighttransfer.kernels.sparse_estimators import Antidiagonal, estimate_lists
    from lighttransfer.kernels.sparse_prefill import block_sparse_attention_reference

    bench = _script()
    q, k, v = bench.synthetic_qkv(100, heads=4, kv_heads=2, dim=16, dtype=torch.float32, device="cpu")
    lists = estimate_lists(Antidiagonal(stride=4), q, k, alpha=0.6, block_q=16, block_k=16)
    assert lists.density() < 0.9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it is unfused
        flex = bench.flex_runner(lists, 4, "cpu", compiled=False)(q, k, v)
    torch.testing.assert_close(flex, block_sparse_attention_reference(q, k, v, lists), atol=1e-5, rtol=1e-5)


def test_tiny_run_writes_json_and_markdown(tmp_path):
    bench = _script()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bench.main(["--out", str(tmp_path), "--tiny", "--lengths", "64", "--methods", "antidiag"])
    result = json.loads((tmp_path / "sparse_prefill.json").read_text())
    rows = {r["layout"]: r for r in result["rows"]}
    assert sorted(rows) == ["kv-sum", "kv-sum-unpacked", "query"]
    row = rows["query"]  # flex runs on the first layout only, by default
    assert row["method"] == "antidiag" and 0 < row["density"] <= 1 and row["err_vs_flex"] < 1e-4
    assert row["total_ms"] >= row["estimate_ms"] > 0 and "torch" in result["environment"]
    assert rows["kv-sum"]["packed"] and not rows["kv-sum-unpacked"]["packed"]
    assert rows["kv-sum"]["density"] == rows["kv-sum-unpacked"]["density"]  # the same lists, two kernel layouts
    assert rows["kv-sum"]["err_vs_fp32_reference"] < 1e-4
    assert "antidiag" in (tmp_path / "sparse_prefill.md").read_text()
