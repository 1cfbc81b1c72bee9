"""The Quest-like page-bound selection, TokenSelect's evaluation baseline: candidates scored by pages of keys, not
one by one.

Quest (Tang et al., arXiv 2406.10774, Sec. 3) keeps, per KV head and page of ``P`` consecutive keys, the
element-wise minimum ``m_j`` and maximum ``M_j`` of the page's keys, and bounds a query's score on the page by
``u_h(j) = scale * sum_d max(q_{h,d} m_{j,d}, q_{h,d} M_{j,d}) >= scale * q_h · k_t`` for every key ``t`` of page
``j``; the pages of largest bound are attended whole. Here, so that the comparison with TokenSelect isolates the
scoring (exact per-token scores against per-page bounds) and nothing else:

* pages are aligned to absolute key indices (``[jP, (j + 1)P)``), restricted to the candidates of the rule in
  :mod:`.token_select` (the ``init`` first and ``local`` recent keys are always kept and never scored); a page
  whose candidates are all outside is not a page;
* the heads vote as TokenSelect's do, ``S(j) = sum_h softmax_j(u_h(j))`` over the sequence's pages, one set per
  layer and sequence (Quest selects per head);
* the ``k // P`` pages of largest vote are taken, their candidate keys listed: at most ``k`` keys, the budget of a
  TokenSelect row with the same ``k``.

Plain PyTorch on any device: a baseline for quality, not for speed (the page bounds are recomputed from the cached
keys at each call, where Quest maintains them as keys arrive). ``[B, Hkv, pages, D]`` float32 bounds, never a
score matrix.
"""

from __future__ import annotations

import math

import torch

from .token_select import candidate_bounds


def page_bounds(k: torch.Tensor, candidate: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor]:
    """``(minimum, maximum [B, Hkv, pages, D] float32, present [B, pages] bool)``: the element-wise extremes of
    each page's candidate keys, ``k [B, Hkv, N, D]``, ``candidate [B, N]`` bool; ``present``: the page holds a
    candidate (its extremes are ``+inf`` / ``-inf`` otherwise)."""
    batch, kv_heads, n_keys, dim = k.shape
    pages = -(-n_keys // page)
    pad = pages * page - n_keys
    keys = torch.nn.functional.pad(k.float(), (0, 0, 0, pad))
    cand = torch.nn.functional.pad(candidate, (0, pad)).view(batch, 1, pages, page, 1)
    keys = keys.view(batch, kv_heads, pages, page, dim)
    low = keys.masked_fill(~cand, float("inf")).amin(3)
    high = keys.masked_fill(~cand, float("-inf")).amax(3)
    return low, high, cand.view(batch, pages, page).any(-1)


def page_picks_reference(q: torch.Tensor, k: torch.Tensor, *, init: int, local: int, k_select: int, page: int,
                         kv_start: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """The candidates the page-bound rule selects for the last ``n`` queries ``q [B, H, n, D]`` over ``k [B, Hkv,
    N, D]`` (query ``i`` at key index ``N - n + i`` sees the keys up to its own): int64 ``[B, n, k_select]``,
    ascending, ``-1`` in unused slots."""
    batch, heads, n, dim = q.shape
    kv_heads, n_keys = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    lo, hi = candidate_bounds(n_keys, n, kv_start=kv_start, batch=batch, init=init, local=local, device=q.device)
    want = max(1, int(k_select) // int(page))
    out = torch.full((batch, n, int(k_select)), -1, dtype=torch.long, device=q.device)
    t = torch.arange(n_keys, device=q.device).view(1, n_keys)
    for i in range(n):
        cand = (t >= lo) & (t < hi[:, i:i + 1])  # [B, N]
        low, high, present = page_bounds(k, cand, page)  # [B, Hkv, P, D], [B, P]
        qf = q[:, :, i].float().view(batch, kv_heads, group, 1, dim)
        bound = torch.maximum(qf * low.unsqueeze(2), qf * high.unsqueeze(2)).sum(-1) * scale  # [B, Hkv, G, P]
        bound = bound.masked_fill(~present.view(batch, 1, 1, -1), float("-inf"))
        votes = torch.softmax(bound, dim=-1).nan_to_num(0.0).sum((1, 2))  # [B, P]
        votes = votes.masked_fill(~present, float("-inf"))
        top = min(want, votes.shape[-1])
        val, chosen = torch.topk(votes, top, dim=-1)  # [B, top]
        keys = chosen.unsqueeze(-1) * page + torch.arange(page, device=q.device)  # [B, top, page]
        ok = torch.isfinite(val).unsqueeze(-1) & (keys < n_keys)
        keys = keys.clamp(max=n_keys - 1)
        ok &= torch.gather(cand, 1, keys.flatten(1)).view_as(keys)
        listed = torch.where(ok, keys, torch.full_like(keys, n_keys)).flatten(1).sort(-1).values  # -1s last
        listed = torch.where(listed < n_keys, listed, -1)[:, :k_select]
        out[:, i, : listed.shape[-1]] = listed
    return out


__all__ = ["page_bounds", "page_picks_reference"]
