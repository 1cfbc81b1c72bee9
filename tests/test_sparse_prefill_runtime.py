"""Sparse prefill of the full layers in the runtime: routing, threshold, stats, chunked prefill, the stored block."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model
from lighttransfer import load, sparse_prefill_stats
from lighttransfer.errors import LightTransferError
from lighttransfer.hybrid_format import HybridConfig, SparsePrefillConfig
from lighttransfer.runtime import enable_hybrid, prefill_chunked, resolve_layout

STREAMING = [1, 3]  # tiny llama: layers 0 and 2 stay full


def _sparse(alpha: float, min_len: int = 16, method: str = "sample", **extra) -> SparsePrefillConfig:
    return SparsePrefillConfig(method=method, alpha=alpha, min_len=min_len, block_q=16, block_k=16,
                               sink_blocks=1, local_blocks=1, **extra)


def _pair(sparse: SparsePrefillConfig | None):
    model = make_tiny_model("llama")
    layout = resolve_layout(model.config, streaming_layers=STREAMING, sink=4, window=24)
    dense = enable_hybrid(make_tiny_model("llama"), layout)
    return enable_hybrid(model, layout, sparse_prefill=sparse), dense


def _ids(batch, length, seed=0):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["sample", "vslash", "antidiag"])
def test_alpha_one_equals_dense_prefill(method):
    model, dense = _pair(_sparse(1.0, method=method))
    ids = _ids(2, 70)
    with torch.no_grad():
        got, want = model(ids).logits, dense(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    stats = sparse_prefill_stats(model)
    assert sorted(stats.density_by_layer()) == [0, 2]  # the full layers, not the streaming ones
    assert all(d == 1.0 for d in stats.density_by_layer().values())


def test_low_alpha_skips_blocks_and_below_threshold_stays_dense():
    model, dense = _pair(_sparse(0.3, min_len=64))
    with torch.no_grad():
        short = _ids(1, 40)
        torch.testing.assert_close(model(short).logits, dense(short).logits, atol=1e-5, rtol=1e-5)
        stats = sparse_prefill_stats(model)
        assert stats.records and not any(r.sparse for r in stats.records) and stats.mean_density() is None
        stats.clear()
        out = model(_ids(1, 200, seed=1)).logits
    assert torch.isfinite(out).all()
    density = stats.density_by_layer()
    assert set(density) == {0, 2} and all(d < 0.9 for d in density.values())


def test_left_padding_is_masked_in_the_sparse_path():
    """alpha = 1 with left padding: each padded row equals the same prompt run alone."""
    model, _ = _pair(_sparse(1.0))
    ids = _ids(2, 60, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        alone = model(ids[1:, 13:]).logits
    torch.testing.assert_close(batch[1, 13:], alone[0], atol=1e-4, rtol=1e-4)


def test_chunked_prefill_goes_sparse_per_chunk_once_keys_reach_the_threshold():
    model, dense = _pair(_sparse(1.0, min_len=64))
    ids = _ids(1, 120, seed=2)
    out = prefill_chunked(model, ids, chunk_size=40, logits="all")
    with torch.no_grad():
        want = dense(ids).logits
    torch.testing.assert_close(out.logits, want, atol=1e-4, rtol=1e-4)
    records = [r for r in sparse_prefill_stats(model).records if r.layer == 0]
    assert [(r.queries, r.keys, r.sparse) for r in records] == [(40, 40, False), (40, 80, True), (40, 120, True)]


def test_config_block_round_trip_and_old_blocks(tmp_path):
    block = HybridConfig(num_layers=4, num_kv_heads=2, streaming_layers=STREAMING,
                         sparse_prefill=_sparse(0.9, method="vslash", options={"last_q": 32}).to_dict())
    again = HybridConfig.from_dict(json.loads(json.dumps(block.to_dict())))
    assert again.sparse_prefill_config() == block.sparse_prefill_config()
    old = HybridConfig(num_layers=4, num_kv_heads=2, streaming_layers=STREAMING).to_dict()
    assert "sparse_prefill" not in old and HybridConfig.from_dict(old).sparse_prefill_config() is None
    with pytest.raises(LightTransferError, match="do not apply"):
        HybridConfig.from_dict({**old, "sparse_prefill": {"method": "sample", "options": {"stride": 8}}})
    with pytest.raises(LightTransferError, match="prefill_alpha"):
        SparsePrefillConfig(alpha=1.5)


def test_load_reads_the_block_and_options_override_it(tmp_path):
    model = make_tiny_model("llama")
    HybridConfig(num_layers=4, num_kv_heads=2, streaming_layers=STREAMING, sink=4, window=24,
                 sparse_prefill=_sparse(0.5, method="antidiag", options={"stride": 4}).to_dict()).attach(model.config)
    model.save_pretrained(tmp_path)
    loaded = load(tmp_path, device="cpu")
    cfg = loaded.lighttransfer_runtime.sparse_prefill.config
    assert (cfg.method, cfg.alpha, cfg.options) == ("antidiag", 0.5, {"stride": 4})
    cfg = load(tmp_path, device="cpu", prefill_alpha=0.8).lighttransfer_runtime.sparse_prefill.config
    assert (cfg.method, cfg.alpha) == ("antidiag", 0.8)
    assert load(tmp_path, device="cpu", prefill_sparse="dense").lighttransfer_runtime.sparse_prefill is None
    cfg = load(tmp_path, device="cpu", prefill_sparse="sample").lighttransfer_runtime.sparse_prefill.config
    assert (cfg.method, cfg.options, cfg.min_len) == ("sample", {}, 16384)
    with pytest.raises(LightTransferError, match="not known"):
        load(tmp_path, device="cpu", prefill_sparse="flex")


def test_stats_without_sparse_prefill_is_one_line():
    _, dense = _pair(None)
    with pytest.raises(LightTransferError, match="sparse prefill is off"):
        sparse_prefill_stats(dense)


def test_generate_cli_takes_the_sparse_options_and_reports_density(tmp_path, capsys):
    from conftest import run_cli
    from test_runtime_reference import word_tokenizer

    model = make_tiny_model("llama")
    HybridConfig(num_layers=4, num_kv_heads=2, streaming_layers=STREAMING, sink=2, window=8).attach(model.config)
    model.save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    prompt = " ".join(f"w{i}" for i in range(10, 60))
    code, out, err = run_cli(["generate", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "3", "--device",
                              "cpu", "--prefill-sparse", "antidiag", "--prefill-alpha", "1.0", "--prefill-min-len",
                              "8"], capsys)
    assert code == 0, err
    assert "sparse prefill (antidiag, alpha 1.0): 100% of the causal key blocks" in err
    dense_code, dense_out, _ = run_cli(["generate", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "3",
                                        "--device", "cpu"], capsys)
    assert dense_code == 0 and dense_out == out  # alpha = 1: the same greedy text


def test_sparse_prefill_ranges_are_checked_before_the_weights_load(tmp_path, monkeypatch):
    from lighttransfer.runtime import loader

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded before the options were checked")

    monkeypatch.setattr(loader, "load_model", no_weights)
    with pytest.raises(LightTransferError, match="prefill_alpha"):
        loader.load(tmp_path, device="cpu", prefill_sparse="sample", prefill_alpha=1.5)
    with pytest.raises(LightTransferError, match="min_len"):
        loader.load(tmp_path, device="cpu", prefill_min_len=0)


@pytest.mark.parametrize("gqa_lists", ["kv-union", "kv-sum"])
def test_lists_per_kv_head_run_through_the_runtime(gqa_lists):
    """Lists per KV head: dense at alpha 1, and at a lower alpha no sparser than per-query-head lists (union)."""
    model, dense = _pair(_sparse(1.0, gqa_lists=gqa_lists))
    ids = _ids(1, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, atol=1e-4, rtol=1e-4)
    per_kv, _ = _pair(_sparse(0.6, gqa_lists=gqa_lists))
    per_q, _ = _pair(_sparse(0.6))
    with torch.no_grad():
        per_kv(ids)
        per_q(ids)
    kv_density, q_density = sparse_prefill_stats(per_kv).mean_density(), sparse_prefill_stats(per_q).mean_density()
    assert 0 < q_density < 1 and 0 < kv_density < 1
    if gqa_lists == "kv-union":
        assert kv_density >= q_density
    assert SparsePrefillConfig.from_dict(_sparse(0.6, gqa_lists=gqa_lists).to_dict()).gqa_lists == gqa_lists
    assert "gqa_lists" not in _sparse(0.6).to_dict()  # the default is not written: older readers load it
