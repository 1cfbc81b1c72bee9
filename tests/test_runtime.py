"""Exactness and memory of the hybrid runtime on tiny models (fp32, CPU).

Short inputs must give the original model's logits; long inputs the masked reference's (an independent full
recompute, see test_runtime_reference.py); decoding with the bounded cache must equal recomputing without it;
streaming layers' cache bytes must stop growing once past sink + window.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from lighttransfer.runtime import StreamingLayer, enable_hybrid, make_cache, resolve_layout, runtime_of
from lighttransfer.runtime.cache import HybridCache
from test_runtime_reference import reference_logits

SINK, WINDOW = 3, 8
STREAMING = [1, 3]
TOL = 1e-5


def hybrid_pair(arch: str, *, streaming_layers=STREAMING, **options):
    """(hybrid model, plain model with the same weights)."""
    model = make_tiny_model(arch)
    chunk_size = options.pop("chunk_size", None)
    layout = resolve_layout(model.config, streaming_layers=list(streaming_layers), sink=SINK, window=WINDOW,
                            **options)
    return enable_hybrid(model, layout, chunk_size=chunk_size), make_tiny_model(arch)


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def cache_kw(model, cache) -> dict:
    """The cache keyword of this transformers release (``cache`` in 5.24, ``past_key_values`` before)."""
    return {runtime_of(model).cache_keyword: cache}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("prefill", ["streaming", "full"])
def test_short_inputs_equal_the_original_model(tiny_arch, prefill):
    model, plain = hybrid_pair(tiny_arch, prefill=prefill)
    ids = random_ids(2, SINK + WINDOW)
    with torch.no_grad():
        assert max_diff(model(ids).logits, plain(ids).logits) <= TOL
        # and token by token through the bounded cache, still inside sink + window
        cache = make_cache(model)
        out = model(ids[:, :4], **cache_kw(model, cache), use_cache=True)
        for t in range(4, ids.shape[1]):
            out = model(ids[:, t:t + 1], **cache_kw(model, out.past_key_values), use_cache=True)
        assert max_diff(out.logits[:, -1], plain(ids).logits[:, -1]) <= TOL


def test_long_inputs_equal_the_masked_reference(tiny_arch):
    model, plain = hybrid_pair(tiny_arch)
    ids = random_ids(2, 45, seed=1)
    with torch.no_grad():
        got = model(ids).logits
        dense = plain(ids).logits
    ref = reference_logits(plain, ids, streaming_layers=STREAMING, sink=SINK, window=WINDOW)
    assert max_diff(got, ref) <= TOL
    assert max_diff(got, dense) > 1e-3  # the streaming layers really changed something


def test_without_cache_equals_the_masked_reference(tiny_arch):
    model, plain = hybrid_pair(tiny_arch)
    ids = random_ids(1, 37, seed=2)
    with torch.no_grad():
        got = model(ids, use_cache=False).logits
    ref = reference_logits(plain, ids, streaming_layers=STREAMING, sink=SINK, window=WINDOW)
    assert max_diff(got, ref) <= TOL


@pytest.mark.parametrize("prefill", ["streaming", "full"])
def test_decoding_with_the_cache_equals_recomputing(tiny_arch, prefill):
    model, plain = hybrid_pair(tiny_arch, prefill=prefill)
    prompt = random_ids(2, 30, seed=3)
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                         do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    steps = torch.stack(out.logits, dim=1)  # [B, new, vocab]
    ref = reference_logits(plain, out.sequences, streaming_layers=STREAMING, sink=SINK, window=WINDOW,
                           full_until=prompt.shape[1] if prefill == "full" else None)
    ref_steps = ref[:, prompt.shape[1] - 1: -1]
    assert max_diff(steps, ref_steps) <= 1e-4
    assert torch.equal(out.sequences[:, prompt.shape[1]:], ref_steps.argmax(-1))


def test_full_prefill_equals_the_original_model_on_the_prompt(tiny_arch):
    model, plain = hybrid_pair(tiny_arch, prefill="full")
    ids = random_ids(2, 40, seed=4)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        assert max_diff(out.logits, plain(ids).logits) <= TOL
    cache = out.past_key_values
    assert isinstance(cache, HybridCache)
    for idx in STREAMING:
        assert cache.layers[idx].keys.shape[2] == SINK + WINDOW  # trimmed right after the prefill


def streaming_bytes(cache: HybridCache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers
               if isinstance(layer, StreamingLayer) and layer.keys is not None)


def test_streaming_cache_bytes_stop_growing_after_sink_plus_window(tiny_arch):
    model, _ = hybrid_pair(tiny_arch)
    ids = random_ids(1, 40, seed=5)
    cache = make_cache(model)
    sizes, dense = [], []
    with torch.no_grad():
        out = model(ids[:, :2], **cache_kw(model, cache), use_cache=True)
        for t in range(2, ids.shape[1]):
            out = model(ids[:, t:t + 1], **cache_kw(model, out.past_key_values), use_cache=True)
            sizes.append(streaming_bytes(cache))
            dense.append(cache.dense_kv_bytes())
    # token t+1 tokens seen after step t: constant from sink + window on, growing before
    full_at = SINK + WINDOW - 3  # index of the step that has seen sink + window tokens
    assert len(set(sizes[full_at:])) == 1
    assert sizes[full_at - 1] < sizes[full_at]
    layer = cache.layers[STREAMING[0]]
    per_token = layer.keys[:, :, :1].nbytes + layer.values[:, :, :1].nbytes
    assert sizes[-1] == len(STREAMING) * (SINK + WINDOW) * per_token
    assert dense[-1] > dense[full_at] and cache.kv_bytes() < cache.dense_kv_bytes()


def test_cache_slots_hold_the_sink_and_the_last_window_positions():
    model, _ = hybrid_pair("llama")
    ids = random_ids(2, 26, seed=6)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # second sequence left-padded by 5
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        nxt = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        out = model(ids[:, -1:], attention_mask=nxt, **cache_kw(model, out.past_key_values), use_cache=True)
    layer = out.past_key_values.layers[STREAMING[0]]
    for b, real in enumerate([27, 22]):
        kept = sorted(p for p in layer.slot_pos[b].tolist() if p >= 0)
        assert kept == [*range(SINK), *range(real - WINDOW, real)]


def test_sampling_is_reproducible_and_bounded(tiny_arch):
    model, _ = hybrid_pair(tiny_arch)
    prompt = random_ids(2, 25, seed=7)
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=15,
                             do_sample=True, temperature=0.9, top_p=0.95, pad_token_id=0,
                             return_dict_in_generate=True)
        runs.append(out)
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    cache = runs[0].past_key_values
    assert isinstance(cache, HybridCache)
    assert all(cache.layers[i].keys.shape[2] == SINK + WINDOW for i in STREAMING)
    assert cache.layers[0].keys.shape[2] == 25 + 15 - 1


def test_beam_search_runs_with_the_bounded_cache():
    model, _ = hybrid_pair("llama")
    prompt = random_ids(1, 20, seed=8)
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                         num_beams=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 26)


def test_full_prefill_backend_is_scoped_and_checked():
    from lighttransfer.runtime import ops

    assert ops._full_prefill[0] == "auto"
    with ops.full_prefill_backend("triton"):
        assert ops._full_prefill[0] == "triton"
        with pytest.raises(ValueError, match="unknown full-layer prefill backend"):
            with ops.full_prefill_backend("flash3"):
                pass
        assert ops._full_prefill[0] == "triton"
    assert ops._full_prefill[0] == "auto"
