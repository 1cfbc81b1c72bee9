"""The head-routing rule: running key moments, QAdA's predicted far share, the oracle, GQA routing."""

from __future__ import annotations

import math

import pytest
import torch
from lighttransfer.errors import LightTransferError
from lighttransfer.kernels import head_routing as hr


def _keys(batch, kv_heads, n, dim, seed, mean=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, kv_heads, n, dim, generator=g) + mean


@pytest.mark.parametrize("block", [4096, 5], ids=["one-block", "blocks-of-5"])
@pytest.mark.parametrize("diagonal", [False, True], ids=["full", "diag"])
def test_moved_moments_equal_the_direct_sums(diagonal, block, monkeypatch):
    """Moving the range step by step (the bulk's growth, the window's slide) gives the moments of the keys in it,
    padding and sinks left out; long moves go in blocks."""
    monkeypatch.setattr(hr, "MOVE_BLOCK", block)
    k = _keys(2, 3, 60, 8, seed=0)
    floor = torch.tensor([4, 13])  # kv_start + sink per sequence
    for lo_of in (lambda hi: 0, lambda hi: max(0, hi - 9)):  # bulk (never drops) and a window of 9
        m = hr.KeyMoments.zeros(2, 3, 8, diagonal=diagonal, device="cpu")
        old = (0, 0)
        for hi in (20, 21, 22, 35, 60):
            new = (lo_of(hi), hi)
            hr.move_range(m, k, old=old, new=new, floor=floor)
            old = new
        lo = lo_of(60)
        for b in range(2):
            sel = k[b, :, max(lo, int(floor[b])):60]
            assert m.count[b] == sel.shape[1]
            torch.testing.assert_close(m.first[b], sel.sum(1))
            want = (sel * sel).sum(1) if diagonal else torch.einsum("hnd,hne->hde", sel, sel)
            torch.testing.assert_close(m.second[b], want, atol=1e-4, rtol=1e-5)
    with pytest.raises(LightTransferError, match="forward"):
        hr.move_range(m, k, old=(5, 10), new=(4, 10), floor=floor)


def test_local_index_edges():
    """Sinks from kv_start, the window up to the last key, each key once; short sequences list fewer keys."""
    idx, ok = hr.local_index(10, torch.tensor([0, 3, 9]), sink=2, window=4)
    got = [sorted(set(idx[b][ok[b]].tolist())) for b in range(3)]
    assert got == [[0, 1, 6, 7, 8, 9], [3, 4, 6, 7, 8, 9], [9]]
    assert [int(ok[b].sum()) for b in range(3)] == [6, 6, 1]  # nothing listed twice
    assert hr.bulk_count(10, torch.tensor([0, 3, 9]), sink=2, window=4).tolist() == [4.0, 1.0, 0.0]


def _exact_by_hand(q, k, kv_start, sink, window, scale):
    batch, heads, _, _ = q.shape
    group = heads // k.shape[1]
    out = torch.zeros(batch, heads)
    n = k.shape[2]
    for b in range(batch):
        s = int(kv_start[b])
        for h in range(heads):
            a = (k[b, h // group, s:] @ q[b, h, 0]) * scale
            w = torch.softmax(a, 0)
            pos = torch.arange(s, n)
            bulk = (pos >= s + sink) & (pos < n - window)
            out[b, h] = w[bulk].sum()
    return out


def test_exact_far_share_is_the_bulk_mass():
    q = torch.randn(2, 4, 1, 8, generator=torch.Generator().manual_seed(1))
    k = _keys(2, 2, 50, 8, seed=2)
    start = torch.tensor([0, 7])
    got = hr.exact_far_share(q, k, n_keys=50, kv_start=start, sink=3, window=10)
    torch.testing.assert_close(got, _exact_by_hand(q, k, start, 3, 10, 8 ** -0.5), atol=1e-5, rtol=1e-4)
    short = hr.exact_far_share(q, k[:, :, :12], n_keys=12, kv_start=start, sink=3, window=10)
    assert torch.equal(short, torch.zeros_like(short))  # no bulk yet


@pytest.mark.parametrize("diagonal", [False, True], ids=["full", "diag"])
def test_gaussian_keys_are_predicted(diagonal):
    """Keys drawn from a Gaussian (correlated dims for the full covariance, independent for the diagonal): the
    predicted far share is close to the true one, across queries of very different far shares."""
    torch.manual_seed(0)
    dim, n, sink, window = 16, 1064, 4, 64
    if diagonal:
        chol = torch.diag(torch.linspace(0.5, 1.5, dim))
    else:
        chol = torch.linalg.cholesky(torch.eye(dim) + 0.6 * torch.ones(dim, dim)) * 0.6
    k = (torch.randn(1, 1, n, dim) @ chol.T) + 0.3
    k[:, :, -window:, 0] += 6.0  # the recent keys stand out along dim 0
    q = torch.randn(1, 8, 1, dim) * 0.5
    q[..., 0] += torch.linspace(-2.0, 4.0, 8).view(1, 8, 1)  # from bulk-seeking to window-seeking queries
    m = hr.KeyMoments.zeros(1, 1, dim, diagonal=diagonal, device="cpu")
    hr.move_range(m, k, old=(0, 0), new=(0, n - window), floor=torch.tensor([sink]))
    start = torch.zeros(1, dtype=torch.long)
    pred = hr.predicted_far_share(q, k, m, n_keys=n, kv_start=start, sink=sink, window=window)
    true = hr.exact_far_share(q, k, n_keys=n, kv_start=start, sink=sink, window=window)
    assert (pred - true).abs().max() < 0.05, (pred, true)
    assert true.min() < 0.1 and true.max() > 0.9  # the queries span the range of shares


def test_diagonal_ignores_the_correlations_the_full_one_sees():
    """Perfectly correlated dims: the full covariance finds the variance along q, the diagonal one misses it."""
    dim = 4
    base = torch.randn(1, 1, 3000, 1, generator=torch.Generator().manual_seed(3))
    k = base.expand(1, 1, 3000, dim) * torch.tensor([1.0, -1.0, 1.0, -1.0])  # k = x (1, -1, 1, -1)
    q = torch.tensor([1.0, 1.0, 1.0, 1.0]).view(1, 1, 1, dim)  # orthogonal to the keys: q·k = 0 always
    full = hr.KeyMoments.zeros(1, 1, dim, diagonal=False, device="cpu")
    diag = hr.KeyMoments.zeros(1, 1, dim, diagonal=True, device="cpu")
    for m in (full, diag):
        hr.accumulate(m, k, torch.ones(1, 3000))
    n_b = torch.tensor([3000.0])
    log_full = hr.gaussian_log_bulk_mass(q, full, n_b, scale=1.0)
    log_diag = hr.gaussian_log_bulk_mass(q, diag, n_b, scale=1.0)
    assert log_full.item() == pytest.approx(math.log(3000), abs=1e-3)  # zero variance along q
    assert log_diag.item() > math.log(3000) + 1.0  # the diagonal adds the per-dim variances


def test_gqa_routing_needs_every_query_head_local():
    share = torch.tensor([[0.1, 0.2, 0.05, 0.6], [0.0, 0.0, 0.3, 0.29]])
    assert hr.route_local(share, 0.3, kv_heads=2).tolist() == [[True, False], [True, True]]
    assert hr.route_local(share, 0.0, kv_heads=2).tolist() == [[False, False], [True, False]]
    tau = torch.tensor([0.5, 0.1])  # a tau per KV head broadcasts
    assert hr.route_local(share, tau, kv_heads=2).tolist() == [[True, False], [True, False]]


def test_random_routing_share():
    g = torch.Generator().manual_seed(0)
    local = hr.random_local(200, 8, 0.25, generator=g)
    assert local.dtype == torch.bool and abs(local.float().mean().item() - 0.25) < 0.03
    with pytest.raises(LightTransferError, match="routing_share"):
        hr.random_local(2, 2, 1.5)
