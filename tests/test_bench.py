"""``benchmark`` and ``lighttransfer bench`` on a tiny model: every variant measured, KV bytes that match the
layout, the markdown table, the shaped-model builder, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from lighttransfer.bench.shaped_model import SHAPES, build_shaped_model
from lighttransfer.bench.speed import RUNTIME_DENSE, benchmark


@pytest.fixture(scope="module")
def bench_result(tiny_model_dir, tmp_path_factory):
    from lighttransfer.kernels.switch import use_reference

    out = tmp_path_factory.mktemp("bench") / "b.json"
    # timing is not under test here: the PyTorch references avoid Triton's (slow) CPU interpreter
    with use_reference():
        result = benchmark(baseline=str(tiny_model_dir), contexts=[64, 96], ratios=[0.5], memory_budget_gb=0.002,
                           decode_steps=2, max_batch=4, sink=2, window=16, device="cpu", dtype="float32",
                           out=out)
    return result, out


def test_every_variant_context_and_batch_is_measured(bench_result):
    result, _ = bench_result
    seen = {(p["variant"], p["context"], p["largest_batch"]) for p in result.points}
    for variant in ("original", RUNTIME_DENSE, "ratio 0.5"):
        for context in (64, 96):
            assert (variant, context, False) in seen and (variant, context, True) in seen
    assert all(p["decode_tokens_per_s"] > 0 for p in result.points)
    assert all(p["prefill_s"] > 0 for p in result.points if not p["largest_batch"])


def test_kv_bytes_follow_the_layout(bench_result):
    """Tiny Llama: 4 layers, 2 KV heads of 16 dims, fp32; the hybrid streams 2 layers with sink 2 + window 16."""
    result, _ = bench_result
    per_token_layer = 2 * 2 * 16 * 4  # keys and values, 2 heads, 16 dims, 4 bytes
    for p in result.points:
        if p["largest_batch"]:
            continue
        if p["variant"] in ("original", RUNTIME_DENSE):
            assert p["kv_bytes"] == 4 * per_token_layer * p["context"]
        else:
            assert p["kv_bytes"] == per_token_layer * (2 * p["context"] + 2 * 18)
            assert p["kv_fraction_expected"] == pytest.approx(p["kv_bytes"] / (4 * per_token_layer * p["context"]))
    big = [p for p in result.points if p["largest_batch"]]
    assert all(1 <= p["batch"] <= 4 for p in big)


def test_outputs_are_written_together(bench_result):
    result, out = bench_result
    data = json.loads(out.read_text())
    assert data["schema_version"] == 2 and len(data["points"]) == len(result.points)
    md = out.with_suffix(".md").read_text()
    assert md.count("| original |") == 4 and "x runtime dense" in md
    assert not list(out.parent.glob(".bench-*"))


def test_shaped_model_has_the_published_shape():
    model = build_shaped_model("llama3-8b-shaped", device=torch.device("cpu"), dtype=torch.bfloat16,
                               num_hidden_layers=1, hidden_size=128, intermediate_size=256, vocab_size=512)
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rope_theta if hasattr(cfg, "rope_theta") else
            cfg.rope_parameters["rope_theta"]) == (32, 8, 500000.0)
    assert SHAPES["llama3-8b-shaped"]["max_position_embeddings"] >= 32768 + 64
    out = model(torch.tensor([[1, 2, 3]])).logits
    assert out.shape == (1, 3, 512) and torch.isfinite(out).all()


def test_bench_cli_runs(tiny_model_dir, tmp_path, capsys):
    from lighttransfer.kernels.switch import use_reference

    out = tmp_path / "r.json"
    with use_reference():
        code, stdout, err = run_cli(["bench", "--baseline", str(tiny_model_dir), "--context", "64", "--ratios", "0.5",
                                     "--decode-steps", "1", "--sink", "2", "--window", "16", "--device", "cpu",
                                     "--out", str(out), "-q"], capsys)
    assert code == 0, err
    assert json.loads(out.read_text())["contexts"] == [64]


@pytest.mark.parametrize("args, match", [
    (["--ratios", "0.5,1.5"], "must be in (0, 1]"),
    (["--context", "4k,x"], "comma-separated list"),
    (["--memory-budget", "-1"], "positive number"),
    (["--baseline", "/no/such/model"], "does not exist"),
], ids=["ratio-out-of-range", "bad-context", "negative-budget", "missing-model"])
def test_bench_cli_errors_are_one_line(tiny_model_dir, tmp_path, capsys, args, match):
    argv = ["bench", "--baseline", str(tiny_model_dir), "--context", "64", "--device", "cpu",
            "--out", str(tmp_path / "r.json"), *args]
    code, _, err = run_cli(argv, capsys)
    assert code != 0 and match in err and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()


def test_every_point_reports_its_bytes_per_step(bench_result, tiny_model_dir):
    """Weights read per step (the untied input embedding excluded) plus the KV held; no bandwidth on the CPU."""
    from lighttransfer.bench.speed import weights_read_per_step
    from transformers import AutoModelForCausalLM

    result, _ = bench_result
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    embed = model.get_input_embeddings().weight
    weights = weights_read_per_step(model)
    assert weights == sum(p.numel() * p.element_size() for p in model.parameters()) - embed.numel() * embed.element_size()
    assert result.weight_bytes_per_step == weights and result.copy_gbps is None
    for p in result.points:
        assert p["bytes_per_step"] == weights + p["kv_bytes"] and p["floor_share"] is None


def test_graphed_rows_continue_the_same_cache_and_say_how_they_ran(tiny_model_dir):
    """``cuda_graphs=True``: every runtime variant gets a second row per point, measured with static steps on the
    same cache (eager on the CPU, and the row says why)."""
    from lighttransfer.bench.speed import GRAPHED, markdown_bench
    from lighttransfer.errors import LightTransferError
    from lighttransfer.kernels.switch import use_reference

    with use_reference():
        result = benchmark(baseline=str(tiny_model_dir), contexts=[48], ratios=[0.5], memory_budget_gb=0.002,
                           decode_steps=2, max_batch=2, sink=2, window=16, device="cpu", dtype="float32",
                           cuda_graphs=True)
    rows = {(p["variant"], p["largest_batch"]): p for p in result.points}
    for variant in (RUNTIME_DENSE, "ratio 0.5"):
        for largest in (False, True):
            eager, graphed = rows[(variant, largest)], rows[(variant + GRAPHED, largest)]
            assert eager["decode_path"] == "eager" and graphed["batch"] == eager["batch"]
            assert graphed["decode_path"].startswith("eager (CUDA graphs need a CUDA device")
    assert ("original" + GRAPHED, False) not in rows
    assert "| ratio 0.5, cuda graph |" in markdown_bench(result)
    with pytest.raises(LightTransferError, match="compiled-baseline needs a CUDA device"):
        benchmark(baseline=str(tiny_model_dir), contexts=[48], device="cpu", compiled_baseline=True)


def test_fused_ops_both_runs_each_runtime_variant_unfused_and_fused(tiny_model_dir):
    """``fused_ops="both"``: a fused row beside every runtime row, flagged, compared with the fused runtime dense."""
    from lighttransfer.bench.speed import FUSED, markdown_bench
    from lighttransfer.errors import LightTransferError
    from lighttransfer.kernels.switch import use_reference

    with use_reference():
        result = benchmark(baseline=str(tiny_model_dir), contexts=[48], ratios=[0.5], largest_batch=False,
                           decode_steps=2, sink=2, window=16, device="cpu", dtype="float32", fused_ops="both")
    rows = {p["variant"]: p for p in result.points}
    assert set(rows) == {"original", RUNTIME_DENSE, "ratio 0.5", RUNTIME_DENSE + FUSED, "ratio 0.5" + FUSED}
    assert [name for name, p in rows.items() if p["fused_ops"]] == [RUNTIME_DENSE + FUSED, "ratio 0.5" + FUSED]
    assert rows["ratio 0.5" + FUSED]["kv_bytes"] == rows["ratio 0.5"]["kv_bytes"]
    assert "| ratio 0.5, fused ops |" in markdown_bench(result)
    with pytest.raises(LightTransferError, match="fused ops must be one of"):
        benchmark(baseline=str(tiny_model_dir), contexts=[48], device="cpu", fused_ops="yes")


def test_the_static_cache_baseline_replicates_its_cache_and_decodes(tiny_model, monkeypatch):
    """The compiled original's host side on the CPU, with torch.compile left out (it needs CUDA for its graphs):
    the StaticCache reserved for the run, replicated to the batch, decoded step by step at the right positions
    (the greedy tokens are those of the dynamic cache)."""
    import lighttransfer.bench.speed as speed

    monkeypatch.setattr(speed, "_compiled_model", lambda model, backend: model)
    monkeypatch.setattr(speed, "WARMUP_STEPS", 1)
    seen = []
    original = tiny_model.forward

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        if kwargs.get("input_ids") is not None and kwargs["input_ids"].shape[1] == 1:
            seen.append(out.logits[:, -1].argmax(-1))
        return out

    monkeypatch.setattr(tiny_model, "forward", spy)
    ids = torch.randint(3, 200, (1, 30), generator=torch.Generator().manual_seed(0))
    point = speed._compiled_point(tiny_model, ids, batch=3, steps=4, device=torch.device("cpu"), largest=True)
    cfg = tiny_model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_key_value_heads * head_dim * 4 * cfg.num_hidden_layers
    assert point.kv_bytes == 3 * per_token * (30 + 1 + 4 + 1) and point.batch == 3 and point.largest_batch
    monkeypatch.setattr(tiny_model, "forward", original)
    want = tiny_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                               do_sample=False, pad_token_id=0, eos_token_id=None)[0, 30:]
    got = torch.stack(seen, 1)  # each decode step's prediction: the token after the one it was fed
    assert got.shape == (3, 5) and len(set(want.tolist())) > 1
    assert torch.equal(got, want[1:6].expand(3, -1))


def test_the_compiled_original_shrinks_its_largest_batch_when_it_runs_out_of_memory(monkeypatch):
    """At the original's largest batch the compiled step may not fit (CUDA-graph pools): each try is 15% smaller,
    batch 1 is tried once, and an error other than out-of-memory stops at once."""
    import lighttransfer.bench.speed as speed
    from lighttransfer.bench.speed import BenchResult

    tried = []

    def fake_point(model, ids, *, batch, steps, device, largest, backend):
        tried.append((batch, largest))
        if largest and batch > 30:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.40 GiB")
        return batch

    monkeypatch.setattr(speed, "_compiled_point", fake_point)
    result = BenchResult(model_id="t", contexts=[64], ratios=[], sink=2, window=8, decode_steps=2,
                         memory_budget_bytes=None, dtype="float32",
                         points=[{"variant": "original", "context": 64, "largest_batch": True, "batch": 40}])
    recorded = []
    cfg = type("C", (), {"vocab_size": 50})()
    speed._compiled_rows(None, cfg, [64], result, recorded.append, gen=torch.Generator().manual_seed(0), steps=2,
                         device=torch.device("cpu"), largest_batch=True, checkpoint=lambda: None)
    assert tried == [(40, True), (34, True), (28, True), (1, False)] and recorded == [28, 1]

    tried.clear()
    monkeypatch.setattr(speed, "_compiled_point", lambda *a, **k: tried.append(k["batch"]) or 1 / 0)
    speed._compiled_rows(None, cfg, [64], result, recorded.append, gen=torch.Generator().manual_seed(0), steps=2,
                         device=torch.device("cpu"), largest_batch=True, checkpoint=lambda: None)
    assert tried == [40, 1]
