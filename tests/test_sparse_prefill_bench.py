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


def _capture_script():
    path = SCRIPT.with_name("capture_qkv.py")
    spec = importlib.util.spec_from_file_location("capture_qkv", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_capture_stacks_layers_along_heads_and_a_prefix_is_a_shorter_capture():
    from conftest import make_tiny_model

    model = make_tiny_model("llama")  # 4 query heads over 2 KV heads, head dim 16
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(0))
    q, k, v = _capture_script().capture(model, ids, [2, 0])
    assert q.shape == (1, 8, 48, 16) and k.shape == v.shape == (1, 4, 48, 16)
    q0, k0, v0 = _capture_script().capture(model, ids[:, :20], [0])
    torch.testing.assert_close(q[:, 4:, :20], q0)  # layer 0 second, as asked; causal: the prefix's own capture
    torch.testing.assert_close(k[:, 2:, :20], k0)
    torch.testing.assert_close(v[:, 2:, :20], v0)
    assert not torch.allclose(k[:, :2], k[:, 2:])  # layer 2 first, and not a copy of layer 0
    assert model.config._attn_implementation == "sdpa"  # the swap is undone


def test_fit_to_shape_keeps_every_head_attention():
    import torch.nn.functional as F

    bench = _script()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 40, 8, generator=g) for h in (6, 3, 3))  # 2 query heads per KV head
    fq, fk, fv = bench.fit_to_shape(q, k, v, heads=8, kv_heads=2, dim=32)  # 4 per KV head, dim 32
    assert fq.shape == (1, 8, 40, 32) and fk.shape == fv.shape == (1, 2, 40, 32)
    captured = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    fitted = F.scaled_dot_product_attention(fq, fk.repeat_interleave(4, 1), fv.repeat_interleave(4, 1), is_causal=True)
    source = [0, 1, 0, 1, 2, 3, 2, 3]  # each KV head's own query heads, round robin
    torch.testing.assert_close(fitted[:, :, :, :8], captured[:, source], atol=1e-5, rtol=1e-5)
    assert fitted[:, :, :, 8:].abs().max() == 0


def test_fit_to_shape_needs_enough_kv_heads():
    import pytest

    bench = _script()
    q, k, v = torch.zeros(1, 3, 4, 8), torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8)
    with pytest.raises(SystemExit, match="capture more --layers"):
        bench.fit_to_shape(q, k, v, heads=8, kv_heads=2, dim=32)


def test_capture_stops_after_the_last_layer_asked_for():
    from conftest import make_tiny_model

    model = make_tiny_model("llama")  # 3 layers
    ran = []
    for index, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda module, args, index=index: ran.append(index))
    _capture_script().capture(model, torch.zeros(1, 8, dtype=torch.long), [1, 0])
    assert ran == [0]  # layer 1's attention inputs end the forward: its MLP and layer 2 never run


def test_tiny_run_on_a_capture_fitted_to_the_shape(tmp_path):
    from conftest import make_tiny_model

    model = make_tiny_model("llama")  # 4 query / 2 KV heads of dim 16; the tiny bench shape has dim 32
    ids = torch.randint(0, 256, (1, 80), generator=torch.Generator().manual_seed(0))
    q, k, v = _capture_script().capture(model, ids, [1])
    torch.save({"q": q, "k": k, "v": v, "layers": [1], "model": "tiny", "length": 80}, tmp_path / "qkv.pt")
    bench = _script()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bench.main(["--out", str(tmp_path / "out"), "--tiny", "--qkv", str(tmp_path / "qkv.pt"), "--fit-shape",
                    "--lengths", "64", "--methods", "sample", "--layouts", "query"])
    result = json.loads((tmp_path / "out" / "sparse_prefill.json").read_text())
    row = result["rows"][0]
    assert row["dim"] == 32 and row["heads"] == 4 and row["kv_heads"] == 2 and row["n"] == 64
    assert row["err_vs_flex"] < 1e-4 and 0 < row["density"] <= 1
    assert "layers [1]" in result["inputs"] and "fitted" in result["inputs"]
