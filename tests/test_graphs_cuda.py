"""The decode step captured in a CUDA graph: each replay gives the logits of the dynamic (eager) path, for
layer-level and head-level hybrids and the dense model through the runtime, with left padding, past the ring's
wrap-around; generation through it equals ``model.generate``."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from lighttransfer.kernels import use_reference
from lighttransfer.runtime import StaticDecoder, enable_hybrid, generate_static, make_cache, resolve_layout
from test_runtime import SINK, WINDOW, cache_kw, hybrid_pair, random_ids
from test_runtime_generate import greedy, left_pad

pytestmark = pytest.mark.cuda
DEV = "cuda"


def _model(which: str, arch: str = "llama"):
    if which == "layers":
        return hybrid_pair(arch)[0].to(DEV)
    model = make_tiny_model(arch)
    if which == "heads":
        layout = resolve_layout(model.config, streaming_layers=[2], head_masks={0: [True, False]}, sink=SINK,
                                window=WINDOW)
    else:
        layout = resolve_layout(model.config, streaming_layers=[], sink=SINK, window=WINDOW)
    return enable_hybrid(model, layout).to(DEV)


def _err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("kernels", ["triton", "reference"])
@pytest.mark.parametrize("which", ["layers", "heads", "dense"])
def test_replays_equal_the_dynamic_steps(which, kernels):
    model = _model(which)
    ids, mask = left_pad([random_ids(1, 29, seed=1)[0], random_ids(1, 11, seed=2)[0]])
    ids, mask = ids.to(DEV), mask.to(DEV)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    new = 3 * (SINK + WINDOW)
    with use_reference(kernels == "reference"), torch.inference_mode():
        caches = []
        for _ in range(2):
            out = model(ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        **cache_kw(model, make_cache(model, max_tokens=ids.shape[1] + new)))
            caches.append(out.past_key_values)
        dynamic, static = caches
        token = out.logits[:, -1].argmax(-1)
        decoder = StaticDecoder(model, static, tokens=ids.shape[1] + new)
        step_mask, pos = mask, positions[:, -1:]
        for i in range(new):
            step_mask = torch.cat([step_mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos + 1
            want = model(token[:, None], attention_mask=step_mask, position_ids=pos, use_cache=True,
                         **cache_kw(model, dynamic)).logits[:, -1]
            got = decoder(token).clone()
            assert _err(got, want) <= 1e-4, f"step {i} ({decoder.path})"
            token = want.argmax(-1)
        assert decoder.path == "cuda graph"
        decoder.close()


@pytest.mark.parametrize("prefill", ["streaming", "full"])
def test_generation_through_the_graph_equals_generate(prefill):
    model = hybrid_pair("qwen2", prefill=prefill)[0].to(DEV)
    ids, mask = left_pad([random_ids(1, 40, seed=3)[0], random_ids(1, 25, seed=4)[0]])
    ids, mask = ids.to(DEV), mask.to(DEV)
    want = greedy(model, ids, mask, new=24)
    got = generate_static(model, ids, attention_mask=mask, max_new_tokens=24, pad_token_id=0,
                          eos_token_id=model.generation_config.eos_token_id)
    assert got.decode_path == "cuda graph"
    assert torch.equal(got.sequences, want.sequences)


def test_a_graph_needs_no_host_sync_and_is_faster_at_batch_one():
    """The replay itself: no device-to-host read inside the step (the capture would fail), and fewer host
    microseconds than the eager step on the same model."""
    import time

    model = _model("layers")
    ids = random_ids(1, 50, seed=5).to(DEV)
    with torch.inference_mode():
        out = model(ids, use_cache=True, **cache_kw(model, make_cache(model, max_tokens=200)))
        decoder = StaticDecoder(model, out.past_key_values, tokens=200)
        token = out.logits[:, -1].argmax(-1)
        for _ in range(3):
            token = decoder(token).argmax(-1)
        assert decoder.path == "cuda graph"
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            token = decoder(token).argmax(-1)
        torch.cuda.synchronize()
        graphed = time.perf_counter() - t0
        decoder.close()
        cache = out.past_key_values
        for _ in range(2):  # the dynamic path's kernels compile at their own shapes first
            token = model(token[:, None], use_cache=True, **cache_kw(model, cache)).logits[:, -1].argmax(-1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            token = model(token[:, None], use_cache=True, **cache_kw(model, cache)).logits[:, -1].argmax(-1)
        torch.cuda.synchronize()
        eager = time.perf_counter() - t0
    assert graphed < eager


def test_the_graph_captured_once_serves_later_generations_of_the_same_shape():
    model = hybrid_pair("llama")[0].to(DEV)
    runtime = model.lighttransfer_runtime
    generate_static(model, random_ids(1, 33, seed=6).to(DEV), max_new_tokens=16)
    (decoder,) = runtime.decoders.values()
    graph = decoder.graph
    assert graph is not None
    for seed, length in ((7, 45), (8, 21)):
        ids = random_ids(1, length, seed=seed).to(DEV)
        want = greedy(model, ids, torch.ones_like(ids), new=16)
        got = generate_static(model, ids, max_new_tokens=16, eos_token_id=model.generation_config.eos_token_id)
        assert got.decode_path == "cuda graph" and decoder.graph is graph and len(runtime.decoders) == 1
        assert torch.equal(got.sequences, want.sequences)
