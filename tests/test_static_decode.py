"""Static decode steps (fixed shapes, device-side counters: what a CUDA graph replays) run eagerly on the CPU and
give the logits and tokens of the dynamic path, for every kind of layer, left padding, chunked prefill and the
dense model through the runtime."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from lighttransfer.errors import LightTransferError
from lighttransfer.runtime import StaticDecoder, enable_hybrid, generate_static, make_cache, resolve_layout
from lighttransfer.runtime.graphs import graphs_unsupported
from test_runtime import SINK, STREAMING, WINDOW, cache_kw, hybrid_pair, max_diff, random_ids
from test_runtime_generate import greedy, left_pad

TOL = 1e-5


def _layouts(arch):
    """(name, model) for a layer-level hybrid, a head-level one (mixed layers) and the dense model, all through
    the runtime."""
    hybrid, _ = hybrid_pair(arch)
    heads = make_tiny_model(arch)
    kv = heads.config.num_key_value_heads
    masks = {0: [True] + [False] * (kv - 1)} if kv > 1 else {}
    enable_hybrid(heads, resolve_layout(heads.config, streaming_layers=[2], head_masks=masks, sink=SINK,
                                        window=WINDOW))
    dense = make_tiny_model(arch)
    enable_hybrid(dense, resolve_layout(dense.config, streaming_layers=[], sink=SINK, window=WINDOW))
    return [("layers", hybrid), ("heads", heads), ("dense", dense)]


@pytest.mark.parametrize("which", ["layers", "heads", "dense"])
def test_static_steps_equal_dynamic_steps(tiny_arch, which):
    """Step by step from the same prefill, through the ring's wrap-around: same logits, same tokens, and the same
    cache contents afterwards."""
    model = dict(_layouts(tiny_arch))[which]
    ids, mask = left_pad([random_ids(1, 23, seed=3)[0], random_ids(1, 9, seed=4)[0]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    new = 2 * (SINK + WINDOW)
    with torch.inference_mode():
        caches = []
        for _ in range(2):
            out = model(ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        **cache_kw(model, make_cache(model, max_tokens=ids.shape[1] + new)))
            caches.append(out.past_key_values)
        dyn_cache, static_cache = caches
        token = out.logits[:, -1].argmax(-1)
        decoder = StaticDecoder(model, static_cache, tokens=ids.shape[1] + new, cuda_graphs=True)
        assert decoder.path.startswith("eager (CUDA graphs need a CUDA device")
        step_mask, pos = mask, positions[:, -1:]
        for _ in range(new):
            step_mask = torch.cat([step_mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
            pos = pos + 1
            want = model(token[:, None], attention_mask=step_mask, position_ids=pos, use_cache=True,
                         **cache_kw(model, dyn_cache)).logits[:, -1]
            got = decoder(token)
            assert max_diff(got, want) <= TOL
            assert torch.equal(got.argmax(-1), want.argmax(-1))
            token = want.argmax(-1)
        decoder.close()
    assert static_cache.get_seq_length() == dyn_cache.get_seq_length()
    for a, b in zip(static_cache.layers, dyn_cache.layers, strict=True):
        assert a.keys.shape == b.keys.shape
        assert max_diff(a.keys, b.keys) <= TOL and max_diff(a.values, b.values) <= TOL


@pytest.mark.parametrize("prefill", ["streaming", "full"])
def test_generate_static_equals_transformers_generate(tiny_arch, prefill):
    model, _ = hybrid_pair(tiny_arch, prefill=prefill)
    ids, mask = left_pad([random_ids(1, 31, seed=1)[0], random_ids(1, 12, seed=2)[0]])
    want = greedy(model, ids, mask, new=20)
    got = generate_static(model, ids, attention_mask=mask, max_new_tokens=20, pad_token_id=0,
                          eos_token_id=model.generation_config.eos_token_id)
    assert torch.equal(got.sequences, want.sequences)
    assert got.decode_path.startswith("eager (CUDA graphs need a CUDA device")
    # the cache is back on the dynamic path and holds what transformers' holds
    assert got.cache.get_seq_length() == want.past_key_values.get_seq_length()
    assert got.cache.kv_bytes() == want.past_key_values.kv_bytes()


def test_generate_static_with_chunked_prefill_and_eos():
    model, _ = hybrid_pair("llama", chunk_size=7)
    ids = random_ids(1, 40, seed=5)
    want = greedy(model, ids, torch.ones_like(ids), new=10)
    got = generate_static(model, ids, max_new_tokens=10)
    assert torch.equal(got.sequences, want.sequences)
    # the 4th new token as end of sequence: generation stops right after it
    eos = int(want.sequences[0, 43])
    first = int((want.sequences[0, 40:] == eos).nonzero()[0])
    stopped = generate_static(model, ids, max_new_tokens=10, eos_token_id=eos)
    assert torch.equal(stopped.sequences, want.sequences[:, : 40 + first + 1])


def test_sampling_is_reproducible_and_top_p_keeps_the_top_token():
    from lighttransfer.runtime.static_generate import next_tokens

    logits = torch.tensor([[0.0, 5.0, 1.0, -3.0]] * 4)
    assert torch.equal(next_tokens(logits, temperature=0.0, top_p=1.0), torch.ones(4, dtype=torch.long))
    # top_p below the top token's probability leaves only it
    assert torch.equal(next_tokens(logits, temperature=1.0, top_p=0.5), torch.ones(4, dtype=torch.long))
    g1, g2 = (torch.Generator().manual_seed(0) for _ in range(2))
    a = next_tokens(logits.repeat(50, 1), temperature=2.0, top_p=1.0, generator=g1)
    b = next_tokens(logits.repeat(50, 1), temperature=2.0, top_p=1.0, generator=g2)
    assert torch.equal(a, b) and len(set(a.tolist())) > 1
    # top_k: only the k most likely tokens are ever drawn
    top2 = next_tokens(logits.repeat(200, 1), temperature=5.0, top_p=1.0, top_k=2)
    assert set(top2.tolist()) == {1, 2}


def test_a_cache_that_cannot_take_static_steps_says_why():
    model, _ = hybrid_pair("llama")
    cache = make_cache(model)
    assert "empty" in cache.static_unsupported()
    with pytest.raises(LightTransferError, match="empty"):
        cache.begin_static(10)
    online = make_tiny_model("llama")
    enable_hybrid(online, resolve_layout(online.config, online_ratio=0.5, sink=SINK, window=WINDOW))
    assert "online" in make_cache(online).static_unsupported()
    assert "CUDA device" in graphs_unsupported(make_cache(model), torch.device("cpu"))
    import dataclasses

    from lighttransfer.hybrid_format import TokenSelectConfig
    from lighttransfer.runtime import runtime_of

    selecting = make_tiny_model("llama")
    layout = runtime_of(model).layout
    enable_hybrid(selecting, dataclasses.replace(layout, selection=TokenSelectConfig(k=8, init=2, local=4)))
    cache = make_cache(selecting)
    with torch.no_grad():
        from lighttransfer.compat import cache_keyword

        selecting(torch.ones(1, 6, dtype=torch.long), use_cache=True, **{cache_keyword(selecting): cache})
    assert cache.static_unsupported() is None  # TokenSelect's steps read the live length on the device
    from lighttransfer.runtime.cache import options_static_unsupported

    assert "TokenSelect and head routing" in options_static_unsupported(layout.selection or
                                                                          TokenSelectConfig(k=8), object())


def test_steps_beyond_the_reserved_length_are_refused():
    model, _ = hybrid_pair("llama", streaming_layers=STREAMING)
    ids = random_ids(1, 10, seed=6)
    with torch.inference_mode():
        out = model(ids, use_cache=True, **cache_kw(model, make_cache(model, max_tokens=12)))
        decoder = StaticDecoder(model, out.past_key_values, tokens=12, cuda_graphs=False)
        token = out.logits[:, -1].argmax(-1)
        for _ in range(2):
            token = decoder(token).argmax(-1)
        with pytest.raises(LightTransferError, match="reserved for 12 tokens"):
            decoder(token)
    assert decoder.path == "eager (cuda_graphs is off)"


def test_a_kept_decoder_serves_the_next_generation_of_the_same_shape():
    """The second generation of a shape copies its prefill into the first one's cache (what its graph reads) and
    gives the tokens transformers' generate gives; another shape gets a decoder of its own."""
    model, _ = hybrid_pair("llama", streaming_layers=STREAMING)
    runtime = model.lighttransfer_runtime
    first = generate_static(model, random_ids(1, 30, seed=7), max_new_tokens=12, cuda_graphs=True)
    assert len(runtime.decoders) == 1
    kept = next(iter(runtime.decoders.values()))
    assert first.cache is kept.cache
    for seed, length in ((8, 41), (9, 17)):
        ids = random_ids(1, length, seed=seed)
        want = greedy(model, ids, torch.ones_like(ids), new=12)
        got = generate_static(model, ids, max_new_tokens=12, cuda_graphs=True,
                              eos_token_id=model.generation_config.eos_token_id)
        assert got.cache is kept.cache and len(runtime.decoders) == 1
        assert torch.equal(got.sequences, want.sequences)
        assert got.cache.get_seq_length() == want.past_key_values.get_seq_length()
        assert got.cache.kv_bytes() == want.past_key_values.kv_bytes()
    # a batch of two is another shape
    ids, mask = left_pad([random_ids(1, 20, seed=10)[0], random_ids(1, 14, seed=11)[0]])
    got = generate_static(model, ids, attention_mask=mask, max_new_tokens=5, cuda_graphs=True)
    assert len(runtime.decoders) == 2 and got.cache is not kept.cache
    assert torch.equal(got.sequences, greedy(model, ids, mask, new=5).sequences)


def test_a_failed_capture_falls_back_to_eager_steps_and_says_why(monkeypatch):
    """The capture's failure path, simulated on the CPU: the step is run eagerly instead, with the same logits as
    an eager static step, and every later step stays eager with the reason kept."""
    import contextlib

    import lighttransfer.runtime.graphs as graphs

    model, _ = hybrid_pair("llama")
    ids = random_ids(1, 20, seed=12)

    @contextlib.contextmanager
    def refuse(graph):
        raise RuntimeError("operation not permitted when stream is capturing")
        yield

    monkeypatch.setattr(graphs.torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(graphs.torch.cuda, "graph", refuse)
    monkeypatch.setattr(graphs.torch.cuda, "synchronize", lambda device=None: None)
    logits = []
    with torch.inference_mode():
        for capture in (True, False):
            out = model(ids, use_cache=True, **cache_kw(model, make_cache(model, max_tokens=30)))
            decoder = StaticDecoder(model, out.past_key_values, tokens=30, cuda_graphs=capture)
            if capture:  # as on a GPU: a graph is wanted, the warm-up step runs on the current stream here
                decoder.reason = None
                monkeypatch.setattr(decoder, "_warmup", decoder._forward)
            token, row = out.logits[:, -1].argmax(-1), []
            for _ in range(4):
                step = decoder(token)
                row.append(step.clone())
                token = step.argmax(-1)
            logits.append(torch.stack(row))
            if capture:
                assert decoder.path == ("eager (capture failed: RuntimeError: operation not permitted when stream "
                                        "is capturing)")
                assert decoder.graph is None
    assert max_diff(logits[0], logits[1]) == 0
