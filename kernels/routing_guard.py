"""A needle guard for QAdA's head routing (:mod:`.head_routing`): per page of bulk keys, an upper bound of any key's
score, so that one outlier key (a needle) the Gaussian bulk model cannot see still turns its head full.

Metadata (Quest's, Tang et al., arXiv 2406.10774, Sec. 3): per (sequence, KV head, page ``j`` of ``P`` key indices
``[j P, (j + 1) P)``), the elementwise maximum ``kmax_j [D]`` and minimum ``kmin_j [D]`` of the page's *bulk* keys
(``index >= kv_start + sink``; sinks and padding never count), and how many bulk keys it holds, ``n_j``. Pages are
fixed in key-index space, so the bulk's growth (one key leaves the window per decode step) only ever *adds* a key
to one page: the update is an elementwise max/min, exact and order-free (no drift, unlike the moments' subtraction).

The bound, for a query head with query ``q [D]`` and scale ``s``: every key ``k`` of page ``j`` has
``kmin_j <= k <= kmax_j`` elementwise, so ``q_d k_d <= max(q_d kmax_jd, q_d kmin_jd)`` for each ``d`` (a linear
function of ``k_d`` is largest at an end of its interval), and summing over ``d``::

    s q·k <= u_j = s Σ_d max(q_d kmax_jd, q_d kmin_jd) = s (q⁺·kmax_j + q⁻·kmin_j),  q⁺ = max(q, 0), q⁻ = min(q, 0)

hence the page's true mass ``Σ_{k in j} exp(s q·k) <= n_j exp(u_j)``. The guard's share of a query head is
``g = max_j sigmoid(log n_j + u_j - lse_L)``: the far share page ``j`` would take on its own, at its bound. A KV
head is routed full when any of its query heads has ``max(f̂, g) > tau`` (:func:`guarded_share`), so no single page
whose own share ``m_j / (m_L + m_j)`` exceeds ``tau`` is ever routed local (``g`` bounds it from above, and the true
far share is at least that page's). Mass spread thinly over many pages is left to the Gaussian ``f̂``.

Cost per decode step and KV head: reading ``2 D`` values per ``P`` bulk keys, ``1 / P`` of the key and value bytes
full attention reads over the bulk (``2 D`` per key): 1.6% at ``P = 64``; memory, the same ``1 / P`` of the bulk's
KV cache. The bounds are stored in the keys' dtype (a max or min of keys is one of their values: exact).

Everything is device-side with host-known shapes (in a static step, one ``index_select``/``index_copy_`` at a device
index), so a step that uses it stays capturable in a CUDA graph. Nothing is ``N x N``: the bound is ``[batch, heads, pages]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LightTransferError

DEFAULT_PAGE = 64


@dataclass
class PageBounds:
    """Per (sequence, KV head, page of ``page`` key indices) the elementwise max and min of the page's bulk keys.

    Attributes:
        kmax: ``[batch, kv_heads, pages, head_dim]`` in the keys' dtype (``-inf`` where the page holds no key).
        kmin: ``[batch, kv_heads, pages, head_dim]`` (``+inf`` where empty).
        count: ``[batch, pages]`` float32, bulk keys per page (the same for every KV head of a sequence).
        page: key indices per page, ``P``.
    """

    kmax: torch.Tensor
    kmin: torch.Tensor
    count: torch.Tensor
    page: int

    @property
    def pages(self) -> int:
        return self.kmax.shape[2]

    @classmethod
    def empty(cls, batch: int, kv_heads: int, pages: int, head_dim: int, *, page: int, dtype: torch.dtype,
              device) -> PageBounds:
        if isinstance(page, bool) or not isinstance(page, int) or page < 1:
            raise LightTransferError(f"routing_page must be a whole number >= 1, got {page!r}.")
        shape = (batch, kv_heads, pages, head_dim)
        return cls(torch.full(shape, float("-inf"), dtype=dtype, device=device),
                   torch.full(shape, float("inf"), dtype=dtype, device=device),
                   torch.zeros(batch, pages, dtype=torch.float32, device=device), page)

    def clear(self) -> None:
        """Empty every page, in the same tensors (a captured step reads those)."""
        self.kmax.fill_(float("-inf"))
        self.kmin.fill_(float("inf"))
        self.count.zero_()

    def grow(self, pages: int) -> None:
        """At least ``pages`` pages (new ones empty); a host-side shape change, for the dynamic path only."""
        extra = pages - self.pages
        if extra <= 0:
            return
        b, h, _, d = self.kmax.shape
        pad = dict(dtype=self.kmax.dtype, device=self.kmax.device)
        self.kmax = torch.cat([self.kmax, torch.full((b, h, extra, d), float("-inf"), **pad)], dim=2)
        self.kmin = torch.cat([self.kmin, torch.full((b, h, extra, d), float("inf"), **pad)], dim=2)
        self.count = torch.cat([self.count, self.count.new_zeros(b, extra)], dim=1)


def pages_for(n_keys: int, page: int) -> int:
    """Pages that cover key indices ``[0, n_keys)``."""
    return max(1, -(-int(n_keys) // int(page)))


def add_range(bounds: PageBounds, keys: torch.Tensor, lo: int, weight: torch.Tensor) -> None:
    """In place: fold the keys ``keys [batch, kv_heads, n, head_dim]`` at key indices ``[lo, lo + n)`` (``lo`` a
    host int) into their pages, where ``weight [batch, n]`` is 1 (a bulk key) and not where it is 0 (padding,
    sinks). The block is padded out to whole pages and reduced page by page (no scatter: any dtype, deterministic);
    indices must lie below ``pages * page``."""
    batch, kv_heads, n, dim = keys.shape
    if n == 0:
        return
    first = lo // bounds.page
    front = lo - first * bounds.page
    span = -(-(front + n) // bounds.page)  # pages the block touches
    back = span * bounds.page - front - n
    take = torch.nn.functional.pad(weight > 0, (front, back)).view(batch, 1, span, bounds.page, 1)
    k = torch.nn.functional.pad(keys.to(bounds.kmax.dtype), (0, 0, front, back)).view(
        batch, kv_heads, span, bounds.page, dim)
    pages = slice(first, first + span)
    torch.maximum(bounds.kmax[:, :, pages], k.masked_fill(~take, float("-inf")).amax(3),
                  out=bounds.kmax[:, :, pages])
    torch.minimum(bounds.kmin[:, :, pages], k.masked_fill(~take, float("inf")).amin(3),
                  out=bounds.kmin[:, :, pages])
    bounds.count[:, pages] += torch.nn.functional.pad(weight.to(torch.float32), (front, back)).view(
        batch, span, bounds.page).sum(-1)


def add_key(bounds: PageBounds, key: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> None:
    """In place, all on the device (a static step, capturable in a CUDA graph): fold one key per sequence, ``key
    [batch, kv_heads, 1, head_dim]`` at key index ``index`` (int64 ``[1]`` on the device), into its page where
    ``weight [batch, 1]`` is 1. A weight-0 key (not in the bulk yet) may point at any index."""
    page = (index.long().view(1) // bounds.page).clamp(min=0, max=bounds.pages - 1)
    take = (weight > 0).view(-1, 1, 1, 1)
    k = key.to(bounds.kmax.dtype)
    bounds.kmax.index_copy_(2, page, torch.maximum(bounds.kmax.index_select(2, page),
                                                   k.masked_fill(~take, float("-inf"))))
    bounds.kmin.index_copy_(2, page, torch.minimum(bounds.kmin.index_select(2, page),
                                                   k.masked_fill(~take, float("inf"))))
    bounds.count.index_add_(1, page, weight.to(torch.float32).view(-1, 1))


def from_scratch(keys: torch.Tensor, *, lo: torch.Tensor, hi: int | torch.Tensor, page: int,
                 pages: int | None = None) -> PageBounds:
    """The bounds of the keys ``[lo[b], hi)`` of ``keys [batch, kv_heads, N, head_dim]`` (``lo`` int ``[batch]``:
    ``kv_start + sink``), computed directly: a page-by-page reduction over a padded view, the reference the
    incremental updates are tested against."""
    batch, kv_heads, big_n, dim = keys.shape
    pages = pages_for(big_n, page) if pages is None else pages
    idx = torch.arange(pages * page, device=keys.device)
    hi_t = torch.as_tensor(hi, device=keys.device).long().view(-1, 1)
    inside = (idx.view(1, -1) >= lo.long().view(-1, 1)) & (idx.view(1, -1) < hi_t) & (idx.view(1, -1) < big_n)
    padded = torch.zeros(batch, kv_heads, pages * page, dim, dtype=keys.dtype, device=keys.device)
    padded[:, :, :big_n] = keys
    mask = inside.view(batch, 1, -1, 1)
    view = (batch, kv_heads, pages, page, dim)
    kmax = padded.masked_fill(~mask, float("-inf")).view(view).amax(3)
    kmin = padded.masked_fill(~mask, float("inf")).view(view).amin(3)
    count = inside.to(torch.float32).view(batch, pages, page).sum(-1)
    return PageBounds(kmax, kmin, count, page)


def score_bounds(q: torch.Tensor, bounds: PageBounds, *, scale: float) -> torch.Tensor:
    """``u [batch, heads, pages]`` float32: ``s Σ_d max(q_d kmax_d, q_d kmin_d)``, an upper bound of ``s q·k`` over
    every key ``k`` of each page (``-inf`` for an empty page), for ``q [batch, heads, 1, head_dim]``."""
    batch, heads, _, dim = q.shape
    kv_heads = bounds.kmax.shape[1]
    qg = q.float().reshape(batch, kv_heads, heads // kv_heads, dim)
    upper = torch.einsum("bkgd,bkpd->bkgp", qg.clamp(min=0.0), bounds.kmax.float()) \
        + torch.einsum("bkgd,bkpd->bkgp", qg.clamp(max=0.0), bounds.kmin.float())
    # an empty page's ±inf meet the zero half of q (0 * inf = nan): masked here
    upper = torch.where((bounds.count > 0).view(batch, 1, 1, -1), upper * scale, float("-inf"))
    return upper.reshape(batch, heads, -1)


def page_share(q: torch.Tensor, bounds: PageBounds, lse_local: torch.Tensor, *, scale: float) -> torch.Tensor:
    """The guard's share ``g [batch, heads]`` float32: ``max_j sigmoid(log n_j + u_j - lse_L)``, the far share the
    best page would take alone at its bound (0 without a bulk key). ``lse_local [batch, heads]``: natural log."""
    u = score_bounds(q, bounds, scale=scale)
    log_mass = u + torch.log(bounds.count).view(u.shape[0], 1, -1)  # log n_j + u_j (-inf for an empty page)
    best = log_mass.amax(-1)
    return torch.sigmoid(best - lse_local).nan_to_num(0.0)


def guarded_share(predicted: torch.Tensor, guard: torch.Tensor) -> torch.Tensor:
    """``max(f̂, g)`` per query head: compared with ``tau`` as ``f̂`` alone is (and what calibration quantiles)."""
    return torch.maximum(predicted, guard)


__all__ = ["PageBounds", "DEFAULT_PAGE", "pages_for", "add_range", "add_key", "from_scratch", "score_bounds", "page_share",
           "guarded_share"]
