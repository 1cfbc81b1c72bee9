"""The Selection Cache lookup kernel (one launch per decode step) against its PyTorch reference: hits, misses by
similarity, by age and from a cold state, forced decisions, counts, static steps' device-side position."""

from __future__ import annotations

import re

import pytest
import torch
from kernel_error_policy import DEVICE, DTYPE_IDS, DTYPES
from lighttransfer.errors import LightTransferError
from lighttransfer.kernels import use_reference
from lighttransfer.kernels.selection_cache import selection_lookup, selection_lookup_reference

COLD_POS = -(1 << 40)


def _state(batch, heads, dim, dtype, seed):
    """Queries as the runtime has them ([B, 1, H, D] storage transposed to [B, H, 1, D]) and anchors that cover
    every case: close to the query (hit), unrelated (miss), close but too old (miss), cold (zeros, far past)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 1, heads, dim, generator=g).to(DEVICE, dtype).transpose(1, 2)
    flat = q.transpose(1, 2).reshape(batch, -1).float()
    anchor = torch.randn(batch, heads * dim, generator=g).to(DEVICE)
    pos = 500
    made = torch.full((batch,), pos - 3, dtype=torch.long, device=DEVICE)
    for b in range(batch):
        case = b % 4
        if case == 0:  # similar and young: a hit
            anchor[b] = flat[b] + 0.05 * torch.randn(heads * dim, generator=g).to(DEVICE)
        elif case == 2:  # similar but older than the bound
            anchor[b] = flat[b]
            made[b] = pos - 40
        elif case == 3:  # cold
            anchor[b] = 0
            made[b] = COLD_POS
    return q, anchor.contiguous(), made, pos


def _both(q, anchor, made, pos, **kw):
    a1, m1, a2, m2 = anchor.clone(), made.clone(), anchor.clone(), made.clone()
    c1 = torch.zeros(2, dtype=torch.long, device=DEVICE)
    c2 = torch.zeros(2, dtype=torch.long, device=DEVICE)
    got = selection_lookup(q, a1, m1, pos, counter=c1, **kw)
    want = selection_lookup_reference(q, a2, m2, pos, counter=c2, **kw)
    return (got, a1, m1, c1), (want, a2, m2, c2)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("batch, heads, dim", [(1, 2, 16), (5, 4, 32), (8, 3, 24)], ids=["B1", "B5", "B8-odd"])
def test_lookup_matches_the_reference(batch, heads, dim, dtype):
    q, anchor, made, pos = _state(batch, heads, dim, dtype, seed=batch * 7 + dim)
    (got, a1, m1, c1), (want, a2, m2, c2) = _both(q, anchor, made, pos, reuse=0.9, max_age=16)
    assert got.dtype == torch.bool and torch.equal(got, want)
    assert want[0] and (batch < 4 or not want.all())  # the cases above give both
    torch.testing.assert_close(a1, a2, atol=0, rtol=0)  # a miss copies its query exactly, a hit keeps its anchor
    assert torch.equal(m1, m2) and torch.equal(c1, c2)
    assert c1.tolist() == [batch, int(want.sum())]
    assert torch.equal(m1[~got], torch.full_like(m1[~got], pos)) and torch.equal(m1[got], made[got])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("batch", [1, 8])
def test_against_the_previous_query_every_lookup_writes_its_query(batch, dtype):
    """``previous``: the same hits as the anchor rule from the same state, but every row's compared query becomes
    this query (hits too), while only the misses' key indices move (a hit keeps its selection's)."""
    q, anchor, made, pos = _state(batch, 3, 24, dtype, seed=11 + batch)
    (got, a1, m1, c1), (want, a2, m2, c2) = _both(q, anchor, made, pos, reuse=0.9, max_age=16, previous=True)
    (anchor_rule, *_), _ = _both(q, anchor, made, pos, reuse=0.9, max_age=16)
    assert torch.equal(got, want) and torch.equal(got, anchor_rule) and bool(got[0])
    flat = q.transpose(1, 2).reshape(batch, -1).float()
    torch.testing.assert_close(a1, flat, atol=0, rtol=0)
    torch.testing.assert_close(a2, flat, atol=0, rtol=0)
    assert torch.equal(m1, m2) and torch.equal(m1[got], made[got]) and bool((m1[~got] == pos).all())
    assert torch.equal(c1, c2)


@pytest.mark.parametrize("force", [True, False], ids=["all-similar", "none-similar"])
def test_forced_decisions_keep_the_age_bound(force):
    q, anchor, made, pos = _state(8, 2, 16, torch.float32, seed=3)
    (got, a1, m1, c1), (want, *_) = _both(q, anchor, made, pos, reuse=0.9, max_age=16, force=force)
    assert torch.equal(got, want)
    young = pos - made <= 16
    assert torch.equal(got, young if force else torch.zeros_like(young))


def test_a_static_step_reads_the_position_on_the_device():
    q, anchor, made, pos = _state(4, 2, 16, torch.float32, seed=5)
    n_valid = torch.tensor([pos + 1], dtype=torch.int32, device=DEVICE)
    a1, m1 = anchor.clone(), made.clone()
    got = selection_lookup(q, a1, m1, reuse=0.9, max_age=16, n_valid=n_valid)
    a2, m2 = anchor.clone(), made.clone()
    want = selection_lookup(q, a2, m2, pos, reuse=0.9, max_age=16)
    assert torch.equal(got, want) and torch.equal(m1, m2) and torch.equal(a1, a2)


def test_use_reference_forces_the_reference(monkeypatch):
    import lighttransfer.kernels.selection_cache_triton as triton_side

    q, anchor, made, pos = _state(2, 2, 16, torch.float32, seed=1)
    monkeypatch.setattr(triton_side, "selection_lookup_triton", lambda *a, **k: pytest.fail("kernel ran"))
    with use_reference():
        selection_lookup(q, anchor, made, pos, reuse=0.9, max_age=4)


@pytest.mark.parametrize("kw, message", [
    (dict(anchor=torch.zeros(2, 31)), "anchor must be a contiguous float32 [2, 32]"),
    (dict(anchor_pos=torch.zeros(2, dtype=torch.int32)), "anchor_pos must be int64 [2]"),
    (dict(counter=torch.zeros(3, dtype=torch.long)), "counter must be int64 [2]"),
    (dict(pos=None), "pass the query's key index as pos"),
    (dict(n_valid=torch.tensor([3])), "not both"),
], ids=["anchor", "anchor-pos", "counter", "no-position", "both-positions"])
def test_bad_input_is_one_clear_error(kw, message):
    args = dict(q=torch.zeros(2, 2, 1, 16), anchor=torch.zeros(2, 32), anchor_pos=torch.zeros(2, dtype=torch.long),
                pos=7)
    args.update(kw)
    with pytest.raises(LightTransferError, match=re.escape(message)):
        selection_lookup(args.pop("q"), args.pop("anchor"), args.pop("anchor_pos"), args.pop("pos"), reuse=0.9,
                         max_age=4, **args)
