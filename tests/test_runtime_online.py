"""Online mode: layers chosen per prompt from the lazy ratio of its last queries, caches trimmed at once."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from lighttransfer.kernels.mask import streaming_visible
from lighttransfer.runtime import OnlineSelector, StreamingLayer, enable_hybrid, resolve_layout
from lighttransfer.runtime.cache import HybridCache
from test_runtime import max_diff, random_ids
from test_runtime_reference import reference_logits

SINK, WINDOW, LAST = 2, 6, 8


def online_model(arch: str, ratio: float = 0.5):
    model = make_tiny_model(arch, num_hidden_layers=6)
    layout = resolve_layout(model.config, online_ratio=ratio, sink=SINK, window=WINDOW, online_last=LAST)
    return enable_hybrid(model, layout), make_tiny_model(arch, num_hidden_layers=6)


def independent_lazy_ratios(plain, ids) -> list[float]:
    """Per layer: mean attention mass of the last LAST queries on their sink + window keys (eager probs)."""
    eager = make_tiny_model("llama", num_hidden_layers=6, attn_implementation="eager")
    eager.load_state_dict(plain.state_dict())
    with torch.no_grad():
        attentions = eager(ids, output_attentions=True).attentions
    length = ids.shape[1]
    q = torch.arange(length - LAST, length).view(-1, 1)
    k = torch.arange(length).view(1, -1)
    kept = streaming_visible(q, k, SINK, WINDOW)
    return [float((a[:, :, -LAST:] * kept).sum(-1).mean()) for a in attentions]


def test_selector_keeps_exactly_the_least_lazy_layers_and_drops_the_rest_early():
    ratios = [0.9, 0.2, 0.95, 0.5, 0.1, 0.7]
    sel = OnlineSelector(num_layers=6, keep=2)
    dropped_when = {}
    for layer, r in enumerate(ratios):
        for victim in sel.offer(layer, r):
            dropped_when[victim] = layer
    assert sel.decided
    assert sel.full_layers == [1, 4]
    assert sel.streaming_layers == [0, 2, 3, 5]
    # each layer is dropped as soon as two less lazy ones have been seen
    assert dropped_when == {2: 2, 0: 3, 3: 4, 5: 5}
    assert OnlineSelector(num_layers=3, keep=0).offer(0, 0.1) == [0]
    everything = OnlineSelector(num_layers=3, keep=3)
    assert [everything.offer(i, 0.5) for i in range(3)] == [[], [], []]


def test_online_mode_picks_the_least_lazy_layers_of_the_prompt():
    model, plain = online_model("llama")
    ids = random_ids(1, 40, seed=1)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, HybridCache) and cache.online.decided
    want = independent_lazy_ratios(plain, ids)
    got = [cache.online.ratios[i] for i in range(6)]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4
    least_lazy = sorted(sorted(range(6), key=lambda i: want[i])[:3])
    assert cache.online.full_layers == least_lazy
    assert cache.streaming_layer_indices() == sorted(set(range(6)) - set(least_lazy))
    # the prefill itself is full attention in every layer (LightTransfer-Test)
    with torch.no_grad():
        assert max_diff(out.logits, plain(ids).logits) <= 1e-5


def test_online_mode_trims_during_prefill_so_peak_memory_falls():
    model, _ = online_model("llama")
    ids = random_ids(1, 48, seed=2)
    held = []

    def after_layer(module, args, kwargs, output):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        full = [layer for layer in cache.layers if not isinstance(layer, StreamingLayer)
                and layer.is_initialized and layer.keys is not None and layer.keys.shape[2] > SINK + WINDOW]
        held.append((len(full), cache.kv_bytes()))

    for layer in model.base_model.layers:
        layer.register_forward_hook(after_layer, with_kwargs=True)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    keep = 3
    assert max(n for n, _ in held) == keep  # never more than P full histories after any layer
    cache = out.past_key_values
    assert cache.kv_bytes() < cache.dense_kv_bytes()
    per_layer_dense = cache.dense_kv_bytes() // 6
    assert max(b for _, b in held) <= keep * per_layer_dense + 6 * per_layer_dense * (SINK + WINDOW) // 48


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_online_decoding_equals_the_reference_with_the_chosen_layers(arch):
    model, plain = online_model(arch)
    prompt = random_ids(1, 30, seed=3)
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                         do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    chosen = out.past_key_values.streaming_layer_indices()
    assert len(chosen) == 3
    ref = reference_logits(plain, out.sequences, streaming_layers=chosen, sink=SINK, window=WINDOW,
                           full_until=prompt.shape[1])
    assert max_diff(torch.stack(out.logits, 1), ref[:, prompt.shape[1] - 1: -1]) <= 1e-4


def test_each_prompt_gets_its_own_choice():
    model, _ = online_model("llama")
    a = model(random_ids(1, 40, seed=4), use_cache=True).past_key_values
    b = model(random_ids(1, 40, seed=5), use_cache=True).past_key_values
    assert a is not b and a.online is not b.online
    assert a.online.decided and b.online.decided
