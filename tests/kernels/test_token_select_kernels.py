"""TokenSelect kernels (soft votes, attention over an index list) vs their fp32 references, and the selection rule."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_error_policy import DEVICE, DTYPE_IDS, DTYPES, assert_within_policy
from lighttransfer.errors import LightTransferError
from lighttransfer.kernels import full_decode_reference, use_reference
from lighttransfer.kernels.token_select import (
    fresh_selection,
    select_attention,
    select_attention_reference,
    select_indices,
    token_votes,
    token_votes_reference,
    total_votes,
)


def _inputs(batch, kv_heads, group, n_keys, dim, dtype, seed, capacity=None, nq=1):
    g = torch.Generator().manual_seed(seed)
    heads = kv_heads * group
    q = torch.randn(batch, nq, heads, dim, generator=g).to(DEVICE, dtype).transpose(1, 2)
    capacity = n_keys if capacity is None else capacity
    k, v = (torch.randn(batch, kv_heads, capacity, dim, generator=g).to(DEVICE, dtype)[:, :, :n_keys]
            for _ in range(2))
    return q, k, v


def _low_votes(q, k, dtype, **kw):
    """The vote reference with its matmul in ``dtype`` (the error policy's low-precision baseline)."""
    return token_votes_reference(q.to(dtype), k.to(dtype), **kw) if dtype == torch.float32 else \
        _votes_in(q, k, dtype, **kw)


def _votes_in(q, k, dtype, *, init, local, kv_start=None):
    scale = 1 / math.sqrt(q.shape[-1])
    group = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(group, dim=1)
    s = (torch.matmul(q, kk.transpose(-1, -2)) * scale).float()  # [B, H, 1, N] in dtype, then fp32
    ref = token_votes_reference(q, k, init=init, local=local, kv_start=kv_start)
    cand = torch.isfinite(ref).repeat_interleave(group, dim=1)
    p = torch.softmax(s.masked_fill(~cand, float("-inf")), -1).nan_to_num(0.0)
    votes = p.view(q.shape[0], k.shape[1], group, 1, -1).sum(2)
    return torch.where(torch.isfinite(ref), votes, ref)


# ----------------------------------------------------------------------------------------------- soft votes
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("group", [1, 4, 8], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("n_keys, init, local", [(1, 0, 0), (40, 4, 8), (113, 16, 32), (1023, 7, 64),
                                                 (300, 200, 150)],
                         ids=["N1", "N40", "N113", "N1023", "no-candidates"])
def test_votes_match_reference(n_keys, init, local, group, dtype):
    """Awkward lengths, GQA ratios, views into larger storage, and a cache with no candidate at all."""
    q, k, _ = _inputs(1, 2, group, n_keys, 32, dtype, seed=n_keys + group, capacity=n_keys + 5)
    votes = token_votes(q, k, init=init, local=local)
    ref = token_votes_reference(q, k, init=init, local=local)[:, :, 0]
    assert votes.shape == ref.shape == (1, 2, n_keys) and votes.dtype == torch.float32
    low = _low_votes(q, k, dtype, init=init, local=local)[:, :, 0]
    assert_within_policy(votes, ref, low, dtype, f"votes N={n_keys} group={group}")


@pytest.mark.parametrize("splits", [1, 3, 64], ids=lambda s: f"splits{s}")
def test_votes_with_padding_and_forced_splits(splits):
    """Batch 3 with left padding (candidates start at kv_start + init), splits that see only padding."""
    dtype = DTYPES[0]
    q, k, _ = _inputs(3, 2, 4, 301, 32, dtype, seed=splits)
    kv_start = torch.tensor([0, 17, 250], device=DEVICE)
    votes = token_votes(q, k, init=5, local=20, kv_start=kv_start, splits=splits)
    ref = token_votes_reference(q, k, init=5, local=20, kv_start=kv_start)[:, :, 0]
    assert_within_policy(votes, ref, _low_votes(q, k, dtype, init=5, local=20, kv_start=kv_start)[:, :, 0], dtype,
                         f"splits={splits}")


def test_votes_of_some_sequences_only():
    """``rows`` scores the listed sequences (in that order) and reads no other."""
    dtype = DTYPES[0]
    q, k, _ = _inputs(4, 2, 2, 90, 16, dtype, seed=4)
    kv_start = torch.tensor([0, 3, 9, 1], device=DEVICE)
    rows = torch.tensor([3, 1], device=DEVICE)
    votes = token_votes(q, k, init=2, local=10, kv_start=kv_start, rows=rows)
    ref = token_votes_reference(q, k, init=2, local=10, kv_start=kv_start)[:, :, 0][rows]
    assert votes.shape == (2, 2, 90)
    low = _low_votes(q, k, dtype, init=2, local=10, kv_start=kv_start)[:, :, 0][rows]
    assert_within_policy(votes, ref, low, dtype, "rows")
    assert token_votes(q, k, init=2, local=10, rows=rows[:0]).shape == (0, 2, 90)


def test_vote_definition_per_head_softmax_summed_over_the_group():
    """The reference's vote is the sum over a KV head's query heads of each head's softmax over the candidates; a
    head with large logits cannot outvote the others by scale alone (each head contributes mass 1)."""
    q, k, _ = _inputs(1, 2, 3, 50, 16, torch.float32, seed=1)
    q[:, 0] *= 100.0  # one head with huge logits
    votes = token_votes_reference(q, k, init=3, local=5)
    finite = torch.isfinite(votes)
    positions = torch.arange(50, device=finite.device)
    assert torch.equal(finite[0, 0, 0], (positions >= 3) & (positions < 45))
    total = votes.masked_fill(~finite, 0).sum(-1)
    torch.testing.assert_close(total, torch.full_like(total, 3.0))  # 3 query heads per KV head, mass 1 each
    # KV head 0 only: group by h // group (contiguous), not h % kv_heads
    s = (q[:, 0:3] @ k[:, 0].transpose(-1, -2).unsqueeze(1)) / 4.0
    s[..., :3] = float("-inf")
    s[..., 45:] = float("-inf")
    torch.testing.assert_close(votes[:, 0], torch.softmax(s, -1).sum(1).masked_fill(~finite[:, 0], float("-inf")))


# ------------------------------------------------------------------------------------- one-pass total vote
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("group", [1, 4, 6], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("n_keys, init, local", [(1, 0, 0), (40, 4, 8), (113, 16, 32), (1023, 7, 64),
                                                 (300, 200, 150)],
                         ids=["N1", "N40", "N113", "N1023", "no-candidates"])
def test_total_votes_match_the_per_kv_head_votes_summed(n_keys, init, local, group, dtype):
    """One read of the keys gives the two-pass reference's votes summed over the KV heads (3 KV heads, so the
    heads' block is padded; a group of 6 is not a power of two)."""
    q, k, _ = _inputs(1, 3, group, n_keys, 32, dtype, seed=n_keys + group, capacity=n_keys + 5)
    votes = total_votes(q, k, init=init, local=local)
    ref = token_votes_reference(q, k, init=init, local=local)[:, :, 0].sum(1)
    assert votes.shape == ref.shape == (1, n_keys) and votes.dtype == torch.float32
    low = _low_votes(q, k, dtype, init=init, local=local)[:, :, 0].sum(1)
    assert_within_policy(votes, ref, low, dtype, f"total votes N={n_keys} group={group}")


@pytest.mark.parametrize("splits", [1, 3, 64], ids=lambda s: f"splits{s}")
def test_total_votes_with_padding_rows_and_forced_splits(splits):
    """Left padding, splits that see only padding, and only some sequences scored (in the order asked)."""
    dtype = DTYPES[0]
    q, k, _ = _inputs(4, 2, 4, 301, 32, dtype, seed=splits)
    kv_start = torch.tensor([0, 17, 250, 3], device=DEVICE)
    ref = token_votes_reference(q, k, init=5, local=20, kv_start=kv_start)[:, :, 0].sum(1)
    low = _low_votes(q, k, dtype, init=5, local=20, kv_start=kv_start)[:, :, 0].sum(1)
    votes = total_votes(q, k, init=5, local=20, kv_start=kv_start, splits=splits)
    assert_within_policy(votes, ref, low, dtype, f"splits={splits}")
    rows = torch.tensor([2, 0], device=DEVICE)
    some = total_votes(q, k, init=5, local=20, kv_start=kv_start, splits=splits, rows=rows)
    assert_within_policy(some, ref[rows], low[rows], dtype, f"rows splits={splits}")
    assert total_votes(q, k, init=5, local=20, rows=rows[:0]).shape == (0, 301)


def _as_sets(idx):
    return [sorted(x for x in row.tolist() if x >= 0) for row in idx.reshape(-1, idx.shape[-1])]


@pytest.mark.parametrize("n_keys, k_select, init, local", [(300, 32, 5, 20), (40, 64, 4, 8), (6, 2, 4, 4),
                                                           (1, 3, 0, 0), (513, 100, 0, 1)],
                         ids=["some", "fewer-than-k", "init-local-overlap", "N1", "no-init"])
def test_a_fresh_list_holds_the_reference_s_keys_once(n_keys, k_select, init, local):
    """The list built in one launch from torch.topk holds init, top-k and recent keys, each once, as the sorted
    reference list does; ``picked`` (the Selection Cache's top-k) is the reference's."""
    q, k, _ = _inputs(3, 2, 2, n_keys, 16, DTYPES[0], seed=n_keys)
    kv_start = torch.tensor([0, min(3, n_keys - 1), n_keys // 2], device=DEVICE)
    votes = token_votes_reference(q, k, init=init, local=local, kv_start=kv_start)[:, :, 0].sum(1)
    votes = votes + torch.arange(n_keys, device=DEVICE) * 1e-3 * torch.isfinite(votes)  # no ties
    picked, idx = fresh_selection(votes, k_select=k_select, init=init, local=local, kv_start=kv_start)
    with use_reference():
        want_picked, want = fresh_selection(votes, k_select=k_select, init=init, local=local, kv_start=kv_start)
    assert idx.shape == want.shape == (3, 1, init + k_select + local) and idx.dtype == torch.int32
    assert picked.shape == (3, k_select) and picked.dtype == torch.long
    assert _as_sets(picked) == _as_sets(want_picked) and torch.equal((picked < 0).sum(-1), (want_picked < 0).sum(-1))
    assert _as_sets(idx) == _as_sets(want)
    assert torch.equal(idx.sort(-1).values, want)


def test_a_fresh_list_attends_like_the_sorted_one():
    q, k, v = _inputs(2, 2, 4, 200, 16, DTYPES[0], seed=3)
    votes = total_votes(q, k, init=4, local=16)
    _, idx = fresh_selection(votes, k_select=24, init=4, local=16)
    torch.testing.assert_close(select_attention(q, k, v, idx), select_attention(q, k, v, idx.sort(-1).values),
                               atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------- selection
def test_selection_is_init_topk_local_disjoint_and_sorted():
    votes = torch.full((2, 1, 1, 30), float("-inf"))
    votes[:, :, :, 4:22] = torch.arange(18, dtype=torch.float32)  # candidates 4..21 (init 4, local 8)
    votes[1, :, :, 4:6] = float("-inf")  # sequence 1 is padded by 2: its candidates start at 2 + 4
    idx = select_indices(votes, k_select=3, init=4, local=8, kv_start=torch.tensor([0, 2]))
    assert idx.dtype == torch.int32 and idx.shape == (2, 1, 15)
    assert idx[0, 0].tolist() == [0, 1, 2, 3, 19, 20, 21, *range(22, 30)]
    assert idx[1, 0].tolist() == [2, 3, 4, 5, 19, 20, 21, *range(22, 30)]


def test_local_keys_below_init_are_not_listed_twice():
    """A short sequence: init and local overlap; every key appears once."""
    votes = torch.full((1, 1, 1, 6), float("-inf"))
    idx = select_indices(votes, k_select=2, init=4, local=4)
    kept = [x for x in idx[0, 0].tolist() if x >= 0]
    assert kept == list(range(6))


def test_selection_with_fewer_candidates_than_k_marks_unused_slots():
    votes = torch.full((1, 2, 10), float("-inf"))
    votes[:, :, 2:5] = 1.0
    idx = select_indices(votes, k_select=8, init=2, local=5)
    kept = [x for x in idx[0, 0].tolist() if x >= 0]
    assert kept == list(range(10)) and (idx == -1).sum() == 5


# ------------------------------------------------------------------------------------ attention over indices
def _check_attention(q, k, v, idx, dtype, what, **kw):
    o = select_attention(q, k, v, idx, **kw)
    assert o.shape == q.shape and o.dtype == q.dtype
    ref = select_attention_reference(q.float(), k.float(), v.float(), idx)
    low = select_attention_reference(q, k, v, idx) if dtype == torch.float32 else _low_attention(q, k, v, idx)
    assert_within_policy(o, ref, low, dtype, what)


def _low_attention(q, k, v, idx):
    """The gather reference with its matmuls in the inputs' dtype."""
    batch, heads, n, dim = q.shape
    group = heads // k.shape[1]
    out = torch.zeros_like(q, dtype=torch.float32)
    for b in range(batch):
        for t in range(n):
            sel = idx[b, t][idx[b, t] >= 0].long()
            if not sel.numel():
                continue
            kk = k[b][:, sel].repeat_interleave(group, 0)
            vv = v[b][:, sel].repeat_interleave(group, 0)
            s = (q[b, :, t:t + 1] @ kk.transpose(-1, -2) / math.sqrt(dim)).float()
            out[b, :, t] = (torch.softmax(s, -1).to(q.dtype) @ vv).float()[:, 0]
    return out


def _random_indices(batch, nq, n_keys, n_sel, seed, holes=True):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(n_keys, generator=g)[:n_sel] for _ in range(batch * nq)]
    idx = torch.stack(rows).view(batch, nq, -1)
    if holes and n_sel > 2:
        idx[:, :, ::3] = -1
    return idx.to(DEVICE, torch.int32)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("group", [1, 4, 8], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("n_keys, n_sel", [(1, 1), (113, 37), (1023, 300), (2049, 2049)],
                         ids=["N1", "N113-S37", "N1023-S300", "N2049-all"])
def test_attention_matches_reference(n_keys, n_sel, group, dtype):
    q, k, v = _inputs(2, 2, group, n_keys, 32, dtype, seed=n_keys + group, capacity=n_keys + 3)
    idx = _random_indices(2, 1, n_keys, n_sel, seed=n_sel, holes=n_sel != n_keys)
    _check_attention(q, k, v, idx, dtype, f"N={n_keys} S={n_sel} group={group}")


@pytest.mark.parametrize("splits", [1, 2, 7, 64], ids=lambda s: f"splits{s}")
def test_attention_several_queries_each_with_its_list(splits):
    """Three queries per sequence (the chunk path), forced split counts incl. splits holding only -1 slots."""
    dtype = DTYPES[0]
    q, k, v = _inputs(2, 2, 2, 200, 16, dtype, seed=splits, nq=3)
    idx = _random_indices(2, 3, 200, 90, seed=splits)
    idx[1, 2, 40:] = -1
    _check_attention(q, k, v, idx, dtype, f"splits={splits}", splits=splits)


def test_every_index_equals_dense_attention():
    """Exactness: listing every key is dense decode attention (the full-layer decode reference), in fp32 (the
    tolerance is fp32's; the half dtypes are covered by the policy tests above)."""
    q, k, v = _inputs(3, 2, 4, 150, 16, torch.float32, seed=11)
    idx = torch.arange(150, device=DEVICE, dtype=torch.int32).flip(0).expand(3, 1, 150).contiguous()
    o = select_attention(q, k, v, idx)
    torch.testing.assert_close(o.float(), full_decode_reference(q, k, v).float(), atol=2e-5, rtol=1e-4)


def test_an_empty_list_gives_zeros():
    q, k, v = _inputs(2, 1, 2, 40, 16, DTYPES[0], seed=6)
    idx = torch.full((2, 1, 20), -1, dtype=torch.int32, device=DEVICE)
    idx[0, 0, :5] = torch.arange(5)
    o = select_attention(q, k, v, idx)
    assert torch.equal(o[1], torch.zeros_like(o[1])) and not torch.isnan(o).any()


def test_use_reference_forces_the_references(monkeypatch):
    import lighttransfer.kernels.token_select as entry

    calls = []
    monkeypatch.setattr(entry, "select_attention_reference",
                        lambda *a, **kw: calls.append("attn") or select_attention_reference(*a, **kw))
    q, k, v = _inputs(1, 1, 2, 10, 16, torch.float32, seed=8)
    with use_reference():
        entry.select_attention(q, k, v, torch.zeros(1, 1, 1, dtype=torch.int32, device=q.device))
    assert calls == ["attn"]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda q, k, v: token_votes(q[:, :, :1].expand(-1, -1, 2, -1), k, init=1, local=1), "one query"),
        (lambda q, k, v: token_votes(q, k, init=-1, local=1), "init and local"),
        (lambda q, k, v: token_votes(q, k, init=1, local=1, kv_start=torch.zeros(5)), "kv_start"),
        (lambda q, k, v: select_attention(q, k, v, torch.zeros(2, 2, 3, dtype=torch.int32)), "indices"),
        (lambda q, k, v: total_votes(q[:, :, :1].expand(-1, -1, 2, -1), k, init=1, local=1), "one query"),
        (lambda q, k, v: total_votes(q, k, init=1, local=1, rows=torch.zeros(1, 1)), "rows"),
        (lambda q, k, v: fresh_selection(torch.zeros(2, 1, 5), k_select=2, init=1, local=1), r"\[rows, N\]"),
    ],
    ids=["two-queries", "negative-init", "kv-start-shape", "indices-shape", "total-two-queries", "total-rows",
         "fresh-shape"],
)
def test_bad_input_is_one_clear_error(call, message):
    q = torch.randn(2, 4, 1, 16)
    k = v = torch.randn(2, 2, 5, 16)
    with pytest.raises(LightTransferError, match=message):
        call(q, k, v)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("batch, n_keys", [(1, 32768 + 37), (4, 8191)], ids=["b1-32k", "b4-8k"])
def test_realistic_shapes_on_gpu(batch, n_keys, dtype):
    """The 8B shape (32 query / 8 KV heads, D=128) with the default init/k/local."""
    q, k, v = _inputs(batch, 8, 4, n_keys, 128, dtype, seed=n_keys, capacity=n_keys + 256)
    kv_start = torch.tensor([(b % 2) * 300 for b in range(batch)], device=DEVICE)
    votes = token_votes(q, k, init=128, local=512, kv_start=kv_start)
    ref = token_votes_reference(q, k, init=128, local=512, kv_start=kv_start)[:, :, 0]
    assert_within_policy(votes, ref, _low_votes(q, k, dtype, init=128, local=512, kv_start=kv_start)[:, :, 0],
                         dtype, "votes")
    idx = select_indices(ref, k_select=2048, init=128, local=512, kv_start=kv_start)
    _check_attention(q, k, v, idx, dtype, "attention")
    total = total_votes(q, k, init=128, local=512, kv_start=kv_start)
    low = _low_votes(q, k, dtype, init=128, local=512, kv_start=kv_start)[:, :, 0].sum(1)
    assert_within_policy(total, ref.sum(1), low, dtype, "total votes")
    _, fresh = fresh_selection(ref.sum(1), k_select=2048, init=128, local=512, kv_start=kv_start)
    assert _as_sets(fresh) == _as_sets(idx)


def test_the_tuned_launchers_keep_only_configs_that_fit():
    """Host side only (no launch): Hopper candidates filtered by shared memory at the element size, the fallback
    elsewhere, one candidate with autotuning off (the benchmark's pinned configs)."""
    from lighttransfer.kernels.decode_launch import fits_hopper
    from lighttransfer.kernels.token_select_triton import GATHER_CONFIGS, _launcher

    hopper = _launcher("gather", (9, 0), 128, 16, True, 2)
    assert [str(c) for c in hopper.configs] == [str(c) for c in GATHER_CONFIGS if fits_hopper(c, 128, 16, 2)]
    assert len(_launcher("vote", (9, 0), 128, 16, False, 2).configs) == 1
    assert len(_launcher("stats", (8, 0), 128, 16, True, 4).configs) == 1
    assert all(c.kwargs["BLOCK_N"] <= 64 for c in _launcher("vote", (9, 0), 256, 16, True, 4).configs)


def test_the_one_pass_vote_s_pinned_tiles_fit_every_gpu_since_ampere():
    """Host side only: 64-key tiles in 3 stages where they fit, fewer stages or keys where not (fp32, D=256)."""
    from lighttransfer.kernels.decode_launch import OTHER_SHARED_MEMORY
    from lighttransfer.kernels.token_select_onepass import _score_tiles

    assert _score_tiles(128, 2) == (64, {"num_warps": 4, "num_stages": 3})
    for block_d in (16, 64, 128, 256):
        for size in (2, 4):
            block_n, launch = _score_tiles(block_d, size)
            assert block_n >= 16 and launch["num_stages"] * block_n * block_d * size < OTHER_SHARED_MEMORY
