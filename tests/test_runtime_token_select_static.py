"""TokenSelect on static decode steps (what one CUDA graph replays at every length): over a cache of capacity
``C`` with the live length ``n`` on the device, the fresh and cached decode steps give what they give over the
unpadded cache of length ``n`` (batch > 1, left padding, GQA; the slots past ``n`` hold NaN, so a key read there
would show); ``generate_static`` with TokenSelect gives ``model.generate``'s tokens and counts, Selection Cache on
and off; on CUDA, a captured graph gives the eager static steps' tokens."""

from __future__ import annotations

import os

import pytest
import torch
from lighttransfer.hybrid_format import TokenSelectConfig
from lighttransfer.runtime import token_select as ts
from lighttransfer.runtime.token_select import SelectionState, SelectionStats, token_select_attention

needs_interpreter = pytest.mark.skipif(not os.environ.get("TRITON_INTERPRET") and not torch.cuda.is_available(),
                                       reason="the kernels need CUDA or the Triton interpreter (TRITON_INTERPRET=1)")


def _queries(batch, heads, dim, steps, *, seed, device):
    """A slow drift (hits at reuse 0.9) with a jump of sequence 1 at step 3 (a miss)."""
    g = torch.Generator().manual_seed(seed)
    cur = torch.randn(batch, heads, 1, dim, generator=g)
    out = []
    for t in range(steps):
        cur = cur + 0.08 * torch.randn(batch, heads, 1, dim, generator=g)
        if t == 3 and batch > 1:
            cur[1] = torch.randn(heads, 1, dim, generator=g)
        out.append(cur.clone().to(device))
    return out


@needs_interpreter
@pytest.mark.parametrize("kernels_on_cpu", [True, False], ids=["kernels", "references"])
@pytest.mark.parametrize("batch,heads,kv_heads,padded,reuse", [(3, 4, 2, True, 0.9), (2, 4, 1, False, 0.9),
                                                                 (3, 4, 2, True, 1.0)],
                         ids=["gqa2-padded-cache", "gqa4-cache", "gqa2-padded-no-cache"])
def test_static_step_over_padded_storage_equals_the_unpadded_cache(batch, heads, kv_heads, padded, reuse,
                                                                   kernels_on_cpu, monkeypatch):
    monkeypatch.setattr(ts, "KERNELS_ON_CPU", kernels_on_cpu)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dim, first, steps, capacity = 16, 40, 8, 61
    g = torch.Generator().manual_seed(3)
    k = torch.full((batch, kv_heads, capacity, dim), float("nan"))
    v = torch.full((batch, kv_heads, capacity, dim), float("nan"))
    k[:, :, :first + steps] = torch.randn(batch, kv_heads, first + steps, dim, generator=g)
    v[:, :, :first + steps] = torch.randn(batch, kv_heads, first + steps, dim, generator=g)
    k, v = k.to(device), v.to(device)
    kv_start = torch.tensor([0, 5, 2][:batch], device=device) if padded else None
    config = TokenSelectConfig(k=6, init=2, local=4, reuse=reuse, reuse_max_age=64)
    qs = _queries(batch, heads, dim, steps, seed=4, device=device)
    dyn_state, dyn_stats = SelectionState(), SelectionStats()
    st_state, st_stats = SelectionState(), SelectionStats()
    n_valid = torch.zeros(1, dtype=torch.int32, device=device)
    for t, q in enumerate(qs):
        n = first + t + 1
        want = token_select_attention(q, k[:, :, :n], v[:, :, :n], config=config, state=dyn_state, stats=dyn_stats,
                                      kv_start=kv_start, scale=None)
        n_valid.fill_(n)
        got = token_select_attention(q, k, v, config=config, state=st_state, stats=st_stats, kv_start=kv_start,
                                     scale=None, n_valid=n_valid)
        assert not got.isnan().any(), f"step {t}: a key past the live length was read"
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        assert torch.equal(st_state.picked.sort(-1).values, dyn_state.picked.sort(-1).values), f"step {t}"
        assert torch.equal(st_state.anchor_pos, dyn_state.anchor_pos), f"step {t}"
    assert (st_stats.lookups, st_stats.hits) == (dyn_stats.lookups, dyn_stats.hits) == \
        (batch * steps, dyn_stats.hits)
    if reuse < 1:
        assert 0 < st_stats.hits < st_stats.lookups - batch  # hits and misses mixed
    else:
        assert st_stats.hits == 0


@needs_interpreter
def test_the_vote_and_the_list_read_the_live_length_not_the_shape():
    """Kernel level: ``total_votes`` and ``fresh_selection`` (fresh and reusing) over storage of capacity 50 with
    ``n_valid = 37`` equal the same calls over the first 37 keys (votes past 37 are -inf, no index reaches it)."""
    from lighttransfer import kernels

    g = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, dim, cap, n = 2, 4, 2, 16, 50, 37
    k = torch.randn(batch, kv_heads, cap, dim, generator=g)
    k[:, :, n:] = float("nan")
    q = torch.randn(batch, heads, 1, dim, generator=g)
    start = torch.tensor([0, 3])
    valid = torch.tensor([n], dtype=torch.int32)
    want = kernels.total_votes(q, k[:, :, :n], init=2, local=4, kv_start=start)
    got = kernels.total_votes(q, k, init=2, local=4, kv_start=start, n_valid=valid)
    torch.testing.assert_close(got[:, :n], want, atol=1e-6, rtol=0)
    assert torch.isneginf(got[:, n:]).all()
    hit = torch.tensor([True, False])
    cached = torch.tensor([[5, 9, 20, -1], [6, 7, 8, 30]])
    anchor = torch.tensor([n - 4, n - 9])
    for extra in ({}, dict(hit=hit, cached=cached, anchor_pos=anchor, extra=6)):
        picks_w, list_w = kernels.fresh_selection(want, k_select=4, init=2, local=4, kv_start=start, **extra)
        picks_g, list_g = kernels.fresh_selection(got, k_select=4, init=2, local=4, kv_start=start, n_valid=valid,
                                                  **extra)
        assert torch.equal(picks_g.sort(-1).values, picks_w.sort(-1).values)
        assert list_g.shape == list_w.shape
        assert torch.equal(list_g.sort(-1).values, list_w.sort(-1).values)
        assert int(list_g.max()) == n - 1


def _selecting_model(reuse: float):
    from conftest import make_tiny_model
    from lighttransfer.runtime import enable_hybrid, resolve_layout, runtime_of

    model = make_tiny_model("llama")
    layout = resolve_layout(model.config, streaming_layers=[1], sink=2, window=8, decode="tokenselect", select_k=8,
                            select_init=2, select_local=4, select_reuse=reuse)
    enable_hybrid(model, layout)
    runtime_of(model).select_chunks = False
    return model


def _ids(seed: int, lengths) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of the given lengths (vocabulary ids 1..), with their attention mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = torch.randint(1, 100, (n,), generator=g)
        mask[b, width - n:] = 1
    return ids, mask


@pytest.mark.parametrize("reuse", [0.5, 1.0], ids=["cache", "no-cache"])
def test_generate_static_with_tokenselect_gives_the_dynamic_tokens(reuse):
    from lighttransfer.runtime import generate_static, runtime_of

    model = _selecting_model(reuse)
    stats = runtime_of(model).selection_stats
    ids, mask = _ids(5, [40, 33])
    with torch.no_grad():
        dynamic = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    want = (stats.lookups, stats.hits, stats.dense)
    stats.reset()
    got = generate_static(model, ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0)
    assert got.decode_path.startswith("eager")  # the CPU: the static steps, without a graph
    assert "TokenSelect" not in got.decode_path
    assert torch.equal(got.sequences[:, -12:], dynamic[:, -12:])
    assert (stats.lookups, stats.hits, stats.dense) == want
    assert want[0] > 0 and want[2] == 0  # it selected at every decode step of every full layer
    if reuse < 1:
        assert 0 < want[1] < want[0]
    # a second generation on the kept static decoder (the cache a graph would read) starts from a clean
    # Selection Cache: begin_static makes every sequence's next lookup a miss, in the same tensors
    decoder = next(iter(runtime_of(model).decoders.values()))
    states = decoder.cache.selection_states
    anchors = {i: s.anchor for i, s in states.items()}
    assert states and all(bool((s.anchor_pos >= 0).all()) for s in states.values())
    with torch.inference_mode():  # as generate_static decodes (the storage is made of inference tensors)
        decoder.cache.begin_static(decoder.tokens_reserved)
    assert all(bool((s.anchor_pos < -(1 << 30)).all()) and not s.anchor.any() and s.anchor is anchors[i]
               for i, s in states.items())
    decoder.pause()
    stats.reset()
    again = generate_static(model, ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0)
    assert torch.equal(again.sequences, got.sequences)
    assert (stats.lookups, stats.hits, stats.dense) == want


def test_an_invalidated_selection_cache_misses_even_for_the_same_query():
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 2, 30, 8, generator=g), torch.randn(2, 2, 30, 8, generator=g)
    q = torch.randn(2, 4, 1, 8, generator=g)
    config = TokenSelectConfig(k=4, init=1, local=2, reuse=0.5)
    valid = torch.tensor([29], dtype=torch.int32)
    state, stats = SelectionState(), SelectionStats()
    fresh = token_select_attention(q, k, v, config=config, state=state, stats=stats, kv_start=None, scale=None,
                                   n_valid=valid)
    token_select_attention(q, k, v, config=config, state=state, stats=stats, kv_start=None, scale=None,
                           n_valid=valid)
    assert (stats.lookups, stats.hits) == (4, 2)  # the same query hits
    # a static step counts on the device, fresh steps too (a replayed graph runs no host code)
    assert next(iter(stats.counts.values())).tolist() == [4, 2]
    state.invalidate()
    stats.reset()
    again = token_select_attention(q, k, v, config=config, state=state, stats=stats, kv_start=None, scale=None,
                                   n_valid=valid)
    assert (stats.lookups, stats.hits) == (2, 0) and int(state.anchor_pos.min()) == 28
    torch.testing.assert_close(again, fresh, atol=1e-6, rtol=0)


def test_tokenselect_with_head_routing_keeps_to_dynamic_steps():
    from lighttransfer.runtime.cache import options_static_unsupported

    assert options_static_unsupported(TokenSelectConfig(k=8), None) is None
    assert "head routing" in options_static_unsupported(TokenSelectConfig(k=8), object())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("reuse", [0.5, 1.0], ids=["cache", "no-cache"])
def test_on_cuda_a_captured_tokenselect_step_gives_the_eager_tokens(reuse):
    """The TokenSelect decode step captured once and replayed per token (the kernels on both sides, fp32): the
    tokens and the counts of eager static steps. (Against ``model.generate`` only on the CPU, above: on a GPU the
    vote's split plan follows the storage's length, so the votes may differ from the dynamic path's in the last
    bits.)"""
    from lighttransfer.runtime import generate_static, runtime_of

    model = _selecting_model(reuse).cuda()
    stats = runtime_of(model).selection_stats
    ids, mask = _ids(6, [48, 40])
    ids, mask = ids.cuda(), mask.cuda()
    eager = generate_static(model, ids, attention_mask=mask, max_new_tokens=16, pad_token_id=0, cuda_graphs=False)
    want = stats.to_dict()
    stats.reset()
    graphed = generate_static(model, ids, attention_mask=mask, max_new_tokens=16, pad_token_id=0, cuda_graphs=True)
    assert graphed.decode_path == "cuda graph"
    assert torch.equal(graphed.sequences, eager.sequences)
    assert stats.to_dict() == want and want["lookups"] > 0
    stats.reset()  # a second generation replays the kept graph from a cold Selection Cache
    again = generate_static(model, ids, attention_mask=mask, max_new_tokens=16, pad_token_id=0, cuda_graphs=True)
    assert torch.equal(again.sequences, eager.sequences) and stats.to_dict() == want
