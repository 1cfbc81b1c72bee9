"""The full layers' preallocated cache (FullLayer): the same tokens as transformers' DynamicLayer, no copy per step.

Every generation check runs the same model twice: with the cache the runtime makes, and with that cache's full
layers (and mixed layers' full heads) swapped back to ``DynamicLayer``, the cache before FullLayer. Both must give
the same tokens and logits.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_model
from lighttransfer import kernels
from lighttransfer.runtime import enable_hybrid, make_cache, ops, prefill_chunked, resolve_layout
from lighttransfer.runtime.cache import FullLayer, HybridCache, MixedLayer, StreamingLayer
from lighttransfer.runtime.full_layer import CAPACITY_ALIGN, GROWTH_MIN_TOKENS
from test_runtime import SINK, WINDOW, cache_kw, hybrid_pair, max_diff, random_ids
from test_runtime_generate import left_pad
from test_runtime_heads import head_pair
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer


def legacy_cache(model) -> HybridCache:
    """The runtime's cache with DynamicLayer where FullLayer now is (the behaviour before FullLayer)."""
    cache = make_cache(model)
    for idx, layer in enumerate(cache.layers):
        if isinstance(layer, FullLayer):
            cache.layers[idx] = DynamicLayer()
        elif isinstance(layer, MixedLayer):
            layer.full = DynamicLayer()
    return cache


def generate(model, ids, mask, cache, **kw):
    options = dict(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True,
                   pad_token_id=0) | kw
    return model.generate(input_ids=ids, attention_mask=mask, **cache_kw(model, cache), **options)


def assert_same_generation(model, ids, mask, **kw):
    new_cache = make_cache(model)
    new = generate(model, ids, mask, new_cache, **kw)
    old = generate(model, ids, mask, legacy_cache(model), **kw)
    assert torch.equal(new.sequences, old.sequences)
    if kw.get("num_beams", 1) == 1:
        assert max_diff(torch.stack(new.logits, 1), torch.stack(old.logits, 1)) <= 1e-5
    assert any(isinstance(layer, (FullLayer, MixedLayer)) for layer in new_cache.layers)
    return new, new_cache


# ---- token for token against DynamicLayer ----------------------------------------------------------------------

@pytest.mark.parametrize("prefill", ["streaming", "full"])
def test_left_padded_generation_equals_dynamic_layer(tiny_arch, prefill):
    model, _ = hybrid_pair(tiny_arch, prefill=prefill)
    ids, mask = left_pad([random_ids(1, n, seed=n)[0] for n in (31, 19, 2)])
    assert_same_generation(model, ids, mask)


def test_all_full_layers_equal_dynamic_layer_and_the_plain_model(tiny_arch):
    model, plain = hybrid_pair(tiny_arch, streaming_layers=[])
    ids, mask = left_pad([random_ids(1, n, seed=n)[0] for n in (23, 9)])
    out, _ = assert_same_generation(model, ids, mask)
    stock = plain.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(out.sequences, stock)


@pytest.mark.parametrize("chunk", [5, 13], ids=lambda c: f"chunk={c}")
def test_chunked_prefill_then_decoding_equals_dynamic_layer(tiny_arch, chunk):
    model, _ = hybrid_pair(tiny_arch)
    ids, mask = left_pad([random_ids(1, 37, seed=1)[0], random_ids(1, 29, seed=2)[0]])
    logits = []
    for cache in (make_cache(model), legacy_cache(model)):
        out = prefill_chunked(model, ids, attention_mask=mask, chunk_size=chunk, cache=cache)
        steps, step_mask = [out.logits[:, -1]], mask
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -1:]
        with torch.no_grad():
            for _ in range(8):
                nxt = steps[-1].argmax(-1, keepdim=True)
                step_mask = torch.cat([step_mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
                pos = pos + 1
                out = model(nxt, attention_mask=step_mask, position_ids=pos, use_cache=True,
                            **cache_kw(model, cache))
                steps.append(out.logits[:, -1])
        logits.append(torch.stack(steps, 1))
    assert max_diff(*logits) <= 1e-5
    assert torch.equal(logits[0].argmax(-1), logits[1].argmax(-1))


def test_generate_with_a_prefill_chunk_size_equals_dynamic_layer():
    model, _ = hybrid_pair("llama", chunk_size=7)
    ids = random_ids(2, 33, seed=4)
    assert_same_generation(model, ids, torch.ones_like(ids))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_beam_search_equals_dynamic_layer(arch):
    model, _ = hybrid_pair(arch)
    ids, mask = left_pad([random_ids(1, 21, seed=8)[0], random_ids(1, 15, seed=9)[0]])
    assert_same_generation(model, ids, mask, num_beams=2, num_return_sequences=2, output_logits=False)


def test_online_mode_equals_dynamic_layer():
    model = make_tiny_model("llama", num_hidden_layers=6)
    model = enable_hybrid(model, resolve_layout(model.config, online_ratio=0.5, sink=2, window=6, online_last=8))
    ids = random_ids(2, 30, seed=10)
    _, cache = assert_same_generation(model, ids, torch.ones_like(ids))
    kinds = [type(layer) for layer in cache.layers]
    assert kinds.count(StreamingLayer) == 3 and kinds.count(FullLayer) == 3  # chosen per prompt, trimmed


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_mixed_layers_equal_dynamic_layer(arch):
    model, _ = head_pair(arch)
    ids, mask = left_pad([random_ids(1, 27, seed=2)[0], random_ids(1, 21, seed=3)[0]])
    _, cache = assert_same_generation(model, ids, mask)
    mixed = [layer for layer in cache.layers if isinstance(layer, MixedLayer)]
    assert mixed and all(isinstance(layer.full, FullLayer) for layer in mixed)
    assert all(layer.keys.data_ptr() == layer.full.key_storage.data_ptr() for layer in mixed)


def test_native_sliding_layers_keep_transformers_sliding_layer():
    model = make_tiny_model("gemma3")
    model = enable_hybrid(model, resolve_layout(model.config, streaming_layers=[3], sink=2, window=4))
    kinds = [type(layer) for layer in make_cache(model).layers]
    assert kinds == [DynamicSlidingWindowLayer, DynamicSlidingWindowLayer, FullLayer, StreamingLayer]


# ---- no copy per step ----------------------------------------------------------------------------------------

def test_decoding_writes_in_place_without_copying_the_cache():
    model, _ = hybrid_pair("llama")
    ids = random_ids(2, 60, seed=11)
    cache = make_cache(model)
    layer = cache.layers[0]
    assert isinstance(layer, FullLayer)
    with torch.no_grad():
        out = model(ids[:, :20], use_cache=True, **cache_kw(model, cache))
        ptr, capacity = layer.key_storage.data_ptr(), layer.capacity
        for t in range(20, 60):
            out = model(ids[:, t:t + 1], use_cache=True, **cache_kw(model, out.past_key_values))
            assert layer.key_storage.data_ptr() == ptr and layer.capacity == capacity
            assert layer.keys.data_ptr() == ptr and layer.keys.shape[2] == t + 1  # a view, never a copy
    assert layer.growths == 0 and capacity == GROWTH_MIN_TOKENS
    # kv_bytes counts the tokens held, allocated_kv_bytes the storage
    per_token = 2 * 2 * 2 * 16 * 4  # batch, K+V, KV heads, head_dim, fp32
    assert layer.nbytes() == 60 * per_token and layer.allocated_bytes() == capacity * per_token
    assert cache.allocated_kv_bytes() - cache.kv_bytes() == 2 * (capacity - 60) * per_token


def test_storage_grows_geometrically_a_logarithmic_number_of_times():
    layer = FullLayer()
    k = torch.zeros(1, 1, 1, 2)
    ptrs, capacities = set(), []
    tokens = 60_000
    for t in range(tokens):
        layer.update(k + t, k - t)
        ptrs.add(layer.key_storage.data_ptr())
        if not capacities or capacities[-1] != layer.capacity:
            capacities.append(layer.capacity)
    assert layer.get_seq_length() == tokens
    assert torch.equal(layer.keys[0, 0, :, 0], torch.arange(tokens, dtype=torch.float32))
    assert torch.equal(layer.values[0, 0, :, 0], -torch.arange(tokens, dtype=torch.float32))
    assert layer.growths == len(capacities) - 1 <= math.ceil(math.log(tokens / GROWTH_MIN_TOKENS, 1.25)) + 1
    assert all(c % CAPACITY_ALIGN == 0 for c in capacities)
    assert all(b >= 1.25 * a and b >= a + GROWTH_MIN_TOKENS for a, b in zip(capacities, capacities[1:], strict=False))
    assert len(ptrs) <= len(capacities)


def test_reserved_cache_allocates_once():
    model, _ = hybrid_pair("llama")
    ids = random_ids(2, 30, seed=12)
    cache = HybridCache(["full", "streaming", "full", "streaming"], sink=SINK, window=WINDOW, max_tokens=30 + 5000)
    out = generate(model, ids, torch.ones_like(ids), cache, max_new_tokens=10)
    assert out.sequences.shape[1] == 40
    for idx in (0, 2):
        layer = cache.layers[idx]
        assert layer.capacity == 5120 and layer.growths == 0  # 5030 rounded up to 256
    # reserving later grows once, to exactly what was asked (rounded)
    cache.reserve(6000)
    assert cache.layers[0].capacity == 6144 and cache.layers[0].seen == 39
    assert torch.equal(cache.layers[0].keys, out.past_key_values.layers[0].keys)


# ---- DynamicLayer's other behaviours -------------------------------------------------------------------------

def _filled(batch=3, tokens=10, reserve=0):
    layer, ref = FullLayer(reserve_tokens=reserve), DynamicLayer()
    g = torch.Generator().manual_seed(0)
    for n in (tokens - 3, 1, 2):
        k, v = torch.randn(batch, 2, n, 4, generator=g), torch.randn(batch, 2, n, 4, generator=g)
        a, b = layer.update(k, v), ref.update(k, v)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    return layer, ref


def _same(layer, ref):
    assert layer.get_seq_length() == ref.get_seq_length()
    assert layer.get_mask_sizes(3) == ref.get_mask_sizes(3)
    assert torch.equal(layer.keys, ref.keys) and torch.equal(layer.values, ref.values)


def test_crop_beam_reorder_select_repeat_and_reset_behave_like_dynamic_layer():
    layer, ref = _filled()
    _same(layer, ref)
    for fn, arg in [("crop", -3), ("crop", 0), ("reorder_cache", torch.tensor([2, 0, 0])),
                    ("batch_select_indices", torch.tensor([1, 2])), ("batch_repeat_interleave", 2)]:
        getattr(layer, fn)(arg)
        getattr(ref, fn)(arg)
        _same(layer, ref)
        k = torch.randn(layer.keys.shape[0], 2, 1, 4)
        a, b = layer.update(k, -k), ref.update(k, -k)  # and it goes on growing in place
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="positive"):
        layer.crop(2)
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.keys is None and not layer.is_initialized
    k = torch.randn(1, 2, 4, 4)
    assert torch.equal(layer.update(k, k)[0], k)


def test_assisted_style_crop_then_rewrite_keeps_the_other_tokens():
    layer, ref = _filled(batch=1, tokens=12)
    layer.crop(-4)
    ref.crop(-4)
    k = torch.randn(1, 2, 6, 4)
    a, b = layer.update(k, k), ref.update(k, k)
    assert torch.equal(a[0], b[0]) and layer.get_seq_length() == 14


def test_make_streaming_builds_the_ring_from_the_full_layers_tokens():
    cache = HybridCache(["full"], sink=2, window=3)
    k = torch.arange(10, dtype=torch.float32).view(1, 1, 10, 1).expand(2, 1, 10, 2).contiguous()
    cache.layers[0].update(k, -k)
    cache.make_streaming(0)
    layer = cache.layers[0]
    assert isinstance(layer, StreamingLayer) and layer.get_seq_length() == 10
    assert sorted(layer.keys[0, 0, :, 0].tolist()) == [0, 1, 7, 8, 9]


# ---- the decode kernel through the runtime (forced on the CPU) -----------------------------------------------

def test_decode_steps_go_to_the_full_decode_kernel_when_enabled(monkeypatch):
    model, _ = hybrid_pair("llama")
    ids, mask = left_pad([random_ids(1, 25, seed=13)[0], random_ids(1, 18, seed=14)[0]])
    sdpa = generate(model, ids, mask, make_cache(model), max_new_tokens=6)
    calls = []
    real = kernels.full_decode
    monkeypatch.setattr(ops.kernels, "full_decode", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    monkeypatch.setattr(ops, "FULL_DECODE_KERNEL_ON_CPU", True)
    kernel = generate(model, ids, mask, make_cache(model), max_new_tokens=6)
    # one call per full layer and decode step (the prefill stays on SDPA)
    assert len(calls) == 2 * 5
    assert all(kw["kv_start"] is not None for kw in calls)
    assert torch.equal(kernel.sequences, sdpa.sequences)
    assert max_diff(torch.stack(kernel.logits, 1), torch.stack(sdpa.logits, 1)) <= 1e-4


def test_mixed_layers_full_heads_decode_through_the_kernel(monkeypatch):
    model, _ = head_pair("llama")
    ids, mask = left_pad([random_ids(1, 14, seed=15)[0], random_ids(1, 9, seed=16)[0]])
    sdpa = generate(model, ids, mask, make_cache(model), max_new_tokens=3)
    monkeypatch.setattr(ops, "FULL_DECODE_KERNEL_ON_CPU", True)
    kernel = generate(model, ids, mask, make_cache(model), max_new_tokens=3)
    assert torch.equal(kernel.sequences, sdpa.sequences)
    assert max_diff(torch.stack(kernel.logits, 1), torch.stack(sdpa.logits, 1)) <= 1e-4


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_decoding_through_the_kernel_equals_sdpa(dtype):
    model, _ = hybrid_pair("llama")
    model.to("cuda", dtype)
    ids, mask = left_pad([random_ids(1, 300, seed=17)[0], random_ids(1, 170, seed=18)[0]])
    ids, mask = ids.cuda(), mask.cuda()
    fast = generate(model, ids, mask, make_cache(model), max_new_tokens=20)
    with kernels.use_reference():  # full layers back on SDPA, streaming layers on their references
        slow = generate(model, ids, mask, make_cache(model), max_new_tokens=20)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert max_diff(torch.stack(fast.logits, 1), torch.stack(slow.logits, 1)) <= tol
    if dtype == torch.float32:
        assert torch.equal(fast.sequences, slow.sequences)
