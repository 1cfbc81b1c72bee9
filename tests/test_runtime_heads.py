"""Head-level hybrids: mixed layers keep their full KV heads whole and their streaming KV heads in sink + ring."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from lighttransfer.runtime import enable_hybrid, make_cache, resolve_layout
from lighttransfer.runtime.cache import MixedLayer
from test_runtime import SINK, WINDOW, cache_kw, max_diff, random_ids
from test_runtime_reference import reference_logits

HEAD_MASKS = {0: [False, True], 1: [True, False]}
STREAMING = [2]
ARCHS = ["llama", "mistral"]  # both GQA with 2 KV heads, so a layer can mix


def head_pair(arch: str, **options):
    model = make_tiny_model(arch)
    layout = resolve_layout(model.config, streaming_layers=STREAMING, head_masks=HEAD_MASKS, sink=SINK,
                            window=WINDOW, **options)
    return enable_hybrid(model, layout), make_tiny_model(arch)


def reference(plain, ids, **kw):
    return reference_logits(plain, ids, streaming_layers=STREAMING, head_masks=HEAD_MASKS, sink=SINK,
                            window=WINDOW, **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_short_inputs_equal_the_original_model(arch):
    model, plain = head_pair(arch)
    ids = random_ids(2, SINK + WINDOW)
    with torch.no_grad():
        assert max_diff(model(ids).logits, plain(ids).logits) <= 1e-5


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("arch", ARCHS)
def test_long_inputs_equal_the_per_head_masked_reference(arch, use_cache):
    model, plain = head_pair(arch)
    ids = random_ids(2, 41, seed=1)
    with torch.no_grad():
        got = model(ids, use_cache=use_cache).logits
    assert max_diff(got, reference(plain, ids)) <= 1e-5
    assert max_diff(got, reference_logits(plain, ids, streaming_layers=STREAMING, sink=SINK,
                                          window=WINDOW)) > 1e-3  # the mixed layers matter


@pytest.mark.parametrize("arch", ARCHS)
def test_decoding_a_padded_batch_with_mixed_layers_equals_recomputing(arch):
    model, plain = head_pair(arch)
    prompt = random_ids(2, 27, seed=2)
    mask = torch.ones_like(prompt)
    mask[1, :6] = 0
    out = model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=14, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    full_mask = torch.cat([mask, torch.ones(2, 14, dtype=mask.dtype)], dim=1)
    ref = reference(plain, out.sequences, attention_mask=full_mask)[:, prompt.shape[1] - 1: -1]
    assert max_diff(torch.stack(out.logits, 1), ref) <= 1e-4
    assert torch.equal(out.sequences[:, prompt.shape[1]:], ref.argmax(-1))


def test_full_prefill_with_mixed_layers_equals_the_reference():
    model, plain = head_pair("llama", prefill="full")
    prompt = random_ids(1, 30, seed=3)
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                         do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    ref = reference(plain, out.sequences, full_until=prompt.shape[1])
    assert max_diff(torch.stack(out.logits, 1), ref[:, prompt.shape[1] - 1: -1]) <= 1e-4


def test_mixed_layers_hold_no_full_size_copy():
    model, _ = head_pair("llama")
    ids = random_ids(1, 50, seed=4)
    cache = make_cache(model)
    with torch.no_grad():
        out = model(ids[:, :30], use_cache=True, **cache_kw(model, cache))
        for t in range(30, 50):
            out = model(ids[:, t:t + 1], use_cache=True, **cache_kw(model, out.past_key_values))
    head_dim = 16
    per_head_token = 2 * head_dim * 4  # keys + values, fp32
    for idx in HEAD_MASKS:
        layer = cache.layers[idx]
        assert isinstance(layer, MixedLayer)
        assert tuple(layer.keys.shape) == (1, 1, 50, head_dim)  # the full KV head: every token
        assert tuple(layer.streaming.keys.shape) == (1, 1, SINK + WINDOW, head_dim)  # the streaming one
        assert layer.nbytes() == per_head_token * (50 + SINK + WINDOW)
    dense = cache.dense_kv_bytes()
    assert dense == 4 * 2 * 50 * per_head_token
    want = per_head_token * (2 * (50 + SINK + WINDOW) + 2 * (SINK + WINDOW) + 2 * 50)
    assert cache.kv_bytes() == want < dense


def test_chunked_prefill_with_mixed_layers_equals_one_pass():
    from lighttransfer.runtime import prefill_chunked

    model, _ = head_pair("llama")
    ids = random_ids(1, 37, seed=5)
    with torch.no_grad():
        one = model(ids, use_cache=True)
        chunked = prefill_chunked(model, ids, chunk_size=6, logits="all")
    assert max_diff(one.logits, chunked.logits) <= 1e-5


# ---- head reordering (full KV heads first, so each group is a view) ---------------------------------------
REORDER_MASKS = {0: [True, False, True, False], 1: [False, True, True, False], 2: [False, False, True, True]}


def _four_kv_heads(arch: str, **overrides):
    return make_tiny_model(arch, num_attention_heads=8, num_key_value_heads=4, **overrides)


def test_grouped_order_puts_full_heads_first_and_inverts():
    from lighttransfer.runtime.head_order import grouped_kv_order, inverse, query_order

    order = grouped_kv_order([True, False, True, False])
    assert order == [1, 3, 0, 2]
    assert [order[i] for i in inverse(order)] == [0, 1, 2, 3]
    assert query_order([1, 0], 2) == [2, 3, 0, 1]


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "qkv-bias"])
@pytest.mark.parametrize("arch", ARCHS)
def test_reordered_heads_give_the_same_logits_and_are_restored(arch, bias):
    from lighttransfer.runtime import disable_hybrid

    overrides = {"attention_bias": True} if bias else {}
    model, plain = _four_kv_heads(arch, **overrides), _four_kv_heads(arch, **overrides)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layout = resolve_layout(model.config, head_masks=REORDER_MASKS, sink=SINK, window=WINDOW)
    enable_hybrid(plain, layout, reorder_heads=False)
    enable_hybrid(model, layout)
    parts = make_cache(model).layers
    assert all(isinstance(parts[i], MixedLayer) and parts[i].grouped for i in REORDER_MASKS)
    assert not torch.equal(model.state_dict()["model.layers.0.self_attn.k_proj.weight"],
                           before["model.layers.0.self_attn.k_proj.weight"])  # the weights really moved
    prompt = random_ids(2, 33, seed=4)
    kw = dict(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True,
              pad_token_id=0)
    got, want = model.generate(input_ids=prompt, **kw), plain.generate(input_ids=prompt, **kw)
    assert torch.equal(got.sequences, want.sequences)
    assert max_diff(torch.stack(got.logits, 1), torch.stack(want.logits, 1)) <= 1e-5
    disable_hybrid(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_reordering_keeps_the_checkpoint_block_consistent():
    from lighttransfer.hybrid_format.config_block import CONFIG_KEY, HybridConfig
    from lighttransfer.runtime import disable_hybrid

    model = _four_kv_heads("llama")
    block = HybridConfig(num_layers=3, num_kv_heads=4, head_masks=REORDER_MASKS, sink=SINK, window=WINDOW,
                         granularity="head")
    block.attach(model.config)
    enable_hybrid(model, resolve_layout(model.config, head_masks=REORDER_MASKS, sink=SINK, window=WINDOW))
    saved = HybridConfig.from_model_config(model.config)
    assert saved.head_masks[0] == [False, False, True, True]  # the masks follow the weights' new order
    assert saved.head_masks[1] == [False, False, True, True]
    disable_hybrid(model)
    assert HybridConfig.from_model_config(model.config).head_masks[0] == REORDER_MASKS[0]
    assert getattr(model.config, CONFIG_KEY)["head_masks"]["1"] == REORDER_MASKS[1]
