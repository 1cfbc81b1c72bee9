"""The pages needle guard: the page score bound is a true upper bound (random and adversarial keys), incremental
page metadata equals metadata from scratch, and a planted needle that QAdA's Gaussian misses is caught."""

from __future__ import annotations

import pytest
import torch
from conftest import planted_needle
from lighttransfer.errors import LightTransferError
from lighttransfer.kernels import head_routing as hr
from lighttransfer.kernels import routing_guard as rg


def _page_max_scores(q, keys, *, lo, hi, page, scale):
    """Reference: ``[batch, heads, pages]`` the largest exact score ``s q·k`` over each page's bulk keys (``-inf``
    where a page holds none), from every key's score (small shapes only)."""
    batch, heads, _, dim = q.shape
    kv_heads, n = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    scores = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].double(),
                          keys.double().repeat_interleave(group, dim=1)) * scale
    idx = torch.arange(n)
    inside = (idx.view(1, -1) >= lo.view(-1, 1)) & (idx.view(1, -1) < hi)
    scores = scores.masked_fill(~inside.view(batch, 1, n), float("-inf"))
    pages = rg.pages_for(n, page)
    padded = torch.full((batch, heads, pages * page), float("-inf"), dtype=torch.float64)
    padded[:, :, :n] = scores
    return padded.view(batch, heads, pages, page).amax(-1)


def _adversarial(batch, kv_heads, n, dim, seed):
    """Keys at the corners of their page's box (every coordinate ±big), one huge coordinate, and exact zeros: where a
    looser or mis-signed bound would show."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (batch, kv_heads, n, dim), generator=g).float() * 2 - 1
    k = signs * 7.0
    k[:, :, ::5] = 0.0
    k[:, :, 3::11, 0] = 1e3
    return k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["random", "adversarial"])
@pytest.mark.parametrize("n,page,group", [(1, 4, 1), (37, 8, 3), (130, 64, 2), (200, 7, 8)],
                         ids=["one-key", "n37-p8-gqa3", "n130-p64-gqa2", "n200-p7-gqa8"])
def test_the_page_bound_is_an_upper_bound_of_every_page_max_score(dtype, kind, n, page, group):
    batch, kv_heads, dim = 2, 2, 16
    keys = (torch.randn(batch, kv_heads, n, dim, generator=torch.Generator().manual_seed(1)) * 3 if kind == "random"
            else _adversarial(batch, kv_heads, n, dim, seed=1)).to(dtype)
    q = torch.randn(batch, kv_heads * group, 1, dim, generator=torch.Generator().manual_seed(2)).to(dtype)
    scale = dim ** -0.5
    lo = torch.tensor([0, min(3, n - 1)])
    bounds = rg.from_scratch(keys, lo=lo, hi=n, page=page)
    got = rg.score_bounds(q, bounds, scale=scale).double()
    want = _page_max_scores(q.float(), keys.float(), lo=lo, hi=n, page=page, scale=scale)
    full = torch.isfinite(want)
    assert torch.equal(full, torch.isfinite(got))  # an empty page has no bound (-inf), a full one a finite one
    slack = 1e-5 * (q.float().abs().sum(-1).double() * keys.float().abs().amax().double() * scale + 1)  # fp32 sums
    assert (got[full] >= want[full] - slack.expand_as(got)[full]).all()
    if page == 1 or n == 1:
        torch.testing.assert_close(got[full], want[full])  # one key per page: the box is the key, the bound exact


def test_a_one_key_page_bound_is_that_key_score():
    keys = torch.randn(1, 1, 9, 8, generator=torch.Generator().manual_seed(3))
    q = torch.randn(1, 2, 1, 8, generator=torch.Generator().manual_seed(4))
    bounds = rg.from_scratch(keys, lo=torch.tensor([0]), hi=9, page=1)
    exact = torch.einsum("bhd,bnd->bhn", q[:, :, 0], keys[:, 0]) * 0.5
    torch.testing.assert_close(rg.score_bounds(q, bounds, scale=0.5), exact)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_incremental_pages_equal_pages_from_scratch(dtype):
    """Adding keys in uneven blocks (a prefill's bulk), then one key per step at a device index, padding and sinks
    left out, gives the direct per-page max, min and count, exactly (max and min do not round)."""
    batch, kv_heads, n, dim, page = 2, 3, 90, 8, 16
    keys = torch.randn(batch, kv_heads, n, dim, generator=torch.Generator().manual_seed(5)).to(dtype)
    floor = torch.tensor([4, 21])
    bounds = rg.PageBounds.empty(batch, kv_heads, 2, dim, page=page, dtype=dtype, device="cpu")
    done = 0
    for hi in (30, 31, 32, 50, 51, 77):  # blocks across page edges, inside one page, one key
        bounds.grow(rg.pages_for(hi, page))
        idx = torch.arange(done, hi)
        rg.add_range(bounds, keys[:, :, done:hi], done, hr.range_weight(idx, floor=floor))
        done = hi
    bounds.grow(rg.pages_for(n, page))
    for i in range(done, n):  # then one key per static step, at a device index
        idx = torch.tensor([i])
        rg.add_key(bounds, keys[:, :, i:i + 1], idx, hr.range_weight(idx, floor=floor))
    idx = torch.tensor([-3])  # a key not in the bulk yet (weight 0) changes nothing
    rg.add_key(bounds, keys[:, :, :1] * 100, idx, hr.range_weight(idx, floor=floor) * 0)
    want = rg.from_scratch(keys, lo=floor, hi=n, page=page)
    assert bounds.pages == want.pages
    assert torch.equal(bounds.kmax, want.kmax) and torch.equal(bounds.kmin, want.kmin)
    assert torch.equal(bounds.count, want.count)
    bounds.clear()
    assert (bounds.count == 0).all() and torch.isinf(bounds.kmax).all()
    with pytest.raises(LightTransferError, match="routing_page"):
        rg.PageBounds.empty(1, 1, 1, 4, page=0, dtype=torch.float32, device="cpu")


SINK, WINDOW, TAU = 4, 8, 0.05


def planted(needle: bool, **kw):
    return planted_needle(needle, window=WINDOW, **kw)


def decide(q, k, scale, guard: str):
    from lighttransfer.hybrid_format import HeadRoutingConfig
    from lighttransfer.runtime.head_routing import HeadRouting, RoutingState

    routing = HeadRouting(HeadRoutingConfig(mode="qada", tau=TAU, guard=guard), sink=SINK, window=WINDOW)
    return routing.decide(q, k, layer_idx=0, state=RoutingState(), kv_start=torch.zeros(1, dtype=torch.long),
                          scale=scale)


def test_a_planted_needle_is_missed_by_qada_and_caught_by_the_guard():
    q, k, scale = planted(needle=True)
    exact = hr.exact_far_share(q, k, n_keys=k.shape[2], kv_start=torch.zeros(1, dtype=torch.long), sink=SINK,
                               window=WINDOW, scale=scale)
    assert exact[0, 2] > 0.99  # the needle takes nearly all of query head 2's attention
    assert exact[0, [0, 1]].max() < TAU  # KV head 0's query heads do not need their far keys
    unguarded = decide(q, k, scale, "none")
    assert unguarded.tolist() == [[True, True]]  # QAdA's Gaussian sees no needle: KV head 1 goes local (wrongly)
    guarded = decide(q, k, scale, "pages")
    assert guarded.tolist() == [[True, False]]  # the guard turns exactly KV head 1 full
    # without the needle the guard stays quiet: it is the needle, not a loose bound, that turns the head full
    q, k, scale = planted(needle=False)
    assert decide(q, k, scale, "pages").tolist() == [[True, True]]


def test_the_guard_share_bounds_each_page_share():
    """``g`` is at least the true share any one page would take alone (so no such page above tau goes local)."""
    q, k, scale = planted(needle=True)
    start = torch.zeros(1, dtype=torch.long)
    n = k.shape[2]
    lse = hr.query_local_lse(q, k, n_keys=n, kv_start=start, sink=SINK, window=WINDOW, scale=scale)
    bounds = rg.from_scratch(k, lo=start + SINK, hi=n - WINDOW, page=64)
    g = rg.page_share(q, bounds, lse, scale=scale)
    scores = torch.einsum("bhd,bhnd->bhn", q[:, :, 0], k.repeat_interleave(2, dim=1)) * scale
    for j in range(bounds.pages):
        a, b = max(SINK, 64 * j), min(n - WINDOW, 64 * (j + 1))
        if a >= b:
            continue
        mass = torch.logsumexp(scores[:, :, a:b], -1)
        own = torch.sigmoid(mass - lse)
        assert (g >= own - 1e-6).all(), j
    assert torch.equal(rg.guarded_share(torch.tensor([0.2, 0.9]), torch.tensor([0.7, 0.1])), torch.tensor([0.7, 0.9]))
