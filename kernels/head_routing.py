"""Query-adaptive head routing (QAdA, Donhauser et al., arXiv 2502.09647): per decode query, does a KV head need
its far context, or is sink + window attention enough?

The rule, for a full layer, query head ``h``, one decode query ``q`` at key index ``p = n - 1`` (the last of ``n``
keys), ``s = scale`` (``1 / sqrt(head_dim)``), a sequence whose real keys start at ``kv_start``:

* local set ``L``: the ``sink`` first real keys ``[kv_start, kv_start + sink)`` and the window of the ``window``
  most recent keys ``[n - window, n)`` (the rule of :mod:`.mask`, positions counted from ``kv_start``);
* bulk ``B``: every other real key, ``[kv_start + sink, n - window)``, ``n_B`` of them (none while ``n <= kv_start
  + sink + window``);
* exact local scores ``a_t = s q·k_t`` on ``L`` and their log-sum-exp ``lse_L`` (natural log);
* Gaussian model of the bulk scores (the paper's Sec. 3): ``s q·k ~ N(s qᵀμ, s² qᵀΣq)`` over ``k`` in the bulk, so
  the expected bulk mass is ``E[sum_B exp(a)] = n_B exp(s qᵀμ + s² qᵀΣq / 2)`` (the log-normal mean), in log
  space ``log m̂_B = log n_B + s qᵀμ + s² qᵀΣq / 2``;
* predicted far share ``f̂ = m̂_B / (m_L + m̂_B) = sigmoid(log m̂_B - lse_L)``;
* GQA: KV head ``g`` serves query heads ``g * G .. g * G + G - 1`` (contiguous groups, as in Llama/Qwen); it is
  routed *local* for a sequence iff every one of its query heads has ``f̂ <= tau`` (full iff any needs full).

Choices made here (the paper released no code):

* ``μ`` and ``Σ`` are the moments of one key set per (sequence, KV head): ``stats="bulk"`` the bulk itself (the
  exact first and second moments of the keys the rule models), ``stats="local"`` the window keys ``[max(kv_start +
  sink, n - window), n)`` only (our reading of the paper's "using only local keys": sink keys are left out, their
  outsized norms are not the bulk's). ``n_B`` is always the exact bulk count.
* Both are kept as running sums in float32 over a range of key indices, ``count``, ``Σ k`` ``[D]`` and ``Σ k kᵀ``
  ``[D, D]`` (``cov="full"``) or ``Σ k²`` ``[D]`` (``cov="diag"``, ``qᵀΣq ≈ Σ_d q_d² Σ_dd``), moved as the range
  moves: :func:`move_range` adds the keys that enter it and subtracts those that leave it (one key per decode
  step: the one leaving the window). ``Σ = Σkkᵀ/n − μμᵀ`` is never formed: ``qᵀΣq = qᵀ(Σkkᵀ)q / n − (q·μ)²``,
  clamped at 0 against rounding.
* ``tau`` compares with the far *share* (a probability in [0, 1]); ``tau = 0`` routes nothing local (but empty
  bulks), ``tau = 1`` everything.
* Where the bulk is empty, local and full attention are the same: the head is routed local.

The oracle (:func:`exact_far_share`) computes the true share densely, ``[batch, heads, N]`` scores of one query per
sequence (never ``N x N``), for evaluation only; :func:`random_local` draws a routing at a given share.

Everything here is device-side tensor work with shapes known on the host, so a decode step that uses it can be
captured in a CUDA graph (the key counts may be int tensors on the device, see ``n_valid``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import LightTransferError

STATS_SOURCES = ("bulk", "local")
# keys per accumulate call when a range moves by many keys at once (the first step after a prefill): bounds the
# float32 copy of the keys it makes
MOVE_BLOCK = 4096
COVARIANCES = ("full", "diag")


@dataclass
class KeyMoments:
    """Running moments of one key range per (sequence, KV head), float32.

    Attributes:
        count: ``[batch]`` keys summed (the same for every KV head of a sequence).
        first: ``[batch, kv_heads, head_dim]`` ``Σ k``.
        second: ``[batch, kv_heads, head_dim, head_dim]`` ``Σ k kᵀ`` (full), or ``[batch, kv_heads, head_dim]``
            ``Σ k²`` (diagonal).
    """

    count: torch.Tensor
    first: torch.Tensor
    second: torch.Tensor

    @property
    def diagonal(self) -> bool:
        return self.second.dim() == 3

    @classmethod
    def zeros(cls, batch: int, kv_heads: int, head_dim: int, *, diagonal: bool, device) -> KeyMoments:
        shape = (batch, kv_heads, head_dim) if diagonal else (batch, kv_heads, head_dim, head_dim)
        return cls(torch.zeros(batch, dtype=torch.float32, device=device),
                   torch.zeros(batch, kv_heads, head_dim, dtype=torch.float32, device=device),
                   torch.zeros(shape, dtype=torch.float32, device=device))


def accumulate(moments: KeyMoments, keys: torch.Tensor, weight: torch.Tensor) -> None:
    """In place: ``moments += Σ_t weight[b, t] · (1, k_t, k_t k_tᵀ)`` for ``keys [batch, kv_heads, n, head_dim]``
    and ``weight [batch, n]`` (1 adds a key, -1 removes it, 0 skips it: padding, sinks). The products are float32."""
    k = keys.float()
    w = weight.to(torch.float32)
    moments.count.add_(w.sum(-1))
    moments.first.add_(torch.einsum("bn,bhnd->bhd", w, k))
    if moments.diagonal:
        moments.second.add_(torch.einsum("bn,bhnd->bhd", w, k * k))
    else:
        moments.second.add_(torch.einsum("bhnd,bhne->bhde", k * w[:, None, :, None], k))


def range_weight(index: torch.Tensor, *, floor: torch.Tensor) -> torch.Tensor:
    """float32 ``[batch, n]``: 1 where key ``index[n]`` (int64 ``[n]``) is at or after ``floor[b]``, else 0."""
    return (index.view(1, -1) >= floor.view(-1, 1)).to(torch.float32)


def move_range(moments: KeyMoments, keys: torch.Tensor, *, old: tuple[int, int], new: tuple[int, int],
               floor: torch.Tensor) -> None:
    """Move ``moments`` from the key-index range ``old = (lo, hi)`` to ``new`` (host ints, ``lo`` and ``hi``
    non-decreasing), over ``keys [batch, kv_heads, N, head_dim]``: keys ``[old_hi, new_hi)`` are added and keys
    ``[old_lo, new_lo)`` removed, each only where ``index >= floor[b]`` (``floor = kv_start + sink``: padding and
    sink keys never count). Reads only the keys that enter or leave."""
    (old_lo, old_hi), (new_lo, new_hi) = old, new
    if new_lo < old_lo or new_hi < old_hi:
        raise LightTransferError(f"move_range: the range only moves forward, got {old} -> {new}.")
    device = keys.device
    add_lo = max(old_hi, new_lo)  # keys past the old range that the new one already dropped never count
    for a in range(add_lo, new_hi, MOVE_BLOCK):
        b = min(new_hi, a + MOVE_BLOCK)
        accumulate(moments, keys[:, :, a:b], range_weight(torch.arange(a, b, device=device), floor=floor))
    for a in range(old_lo, min(new_lo, old_hi), MOVE_BLOCK):
        b = min(new_lo, old_hi, a + MOVE_BLOCK)
        accumulate(moments, keys[:, :, a:b], -range_weight(torch.arange(a, b, device=device), floor=floor))


def local_index(n_keys: torch.Tensor | int, kv_start: torch.Tensor, *, sink: int,
                window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The local set of the last query of each sequence: ``(index [batch, sink + window] int64, valid [batch,
    sink + window] bool)``; sink keys first, then the window, each key listed once, invalid slots at index 0.
    ``n_keys``: keys that exist (an int, or an int tensor ``[1]`` on the device)."""
    device = kv_start.device
    start = kv_start.long().view(-1, 1)
    n = _on_device(n_keys, device).view(-1, 1)
    sink_idx = start + torch.arange(sink, device=device).view(1, -1)
    win_idx = n - window + torch.arange(window, device=device).view(1, -1)
    sink_ok = sink_idx < n
    win_ok = (win_idx >= start + sink) & (win_idx >= 0)
    index = torch.cat([sink_idx.expand(start.shape[0], -1), win_idx.expand(start.shape[0], -1)], dim=1)
    valid = torch.cat([sink_ok.expand(start.shape[0], -1), win_ok.expand(start.shape[0], -1)], dim=1)
    return torch.where(valid, index, 0), valid


def _on_device(n_keys: torch.Tensor | int, device: torch.device) -> torch.Tensor:
    """``n_keys`` as an int64 tensor ``[1]`` on ``device``: a host int is written by a fill kernel, not copied from
    host memory, so the step stays capturable in a CUDA graph (where a pageable host-to-device copy is refused)."""
    if isinstance(n_keys, torch.Tensor):
        return n_keys.to(device=device, dtype=torch.long).view(-1)
    return torch.full((1,), int(n_keys), dtype=torch.long, device=device)


def bulk_count(n_keys: torch.Tensor | int, kv_start: torch.Tensor, *, sink: int, window: int) -> torch.Tensor:
    """float32 ``[batch]``: keys in the bulk ``[kv_start + sink, n - window)`` of the last query."""
    n = _on_device(n_keys, kv_start.device)
    return (n - window - kv_start.long() - sink).clamp(min=0).to(torch.float32)


def local_lse(q: torch.Tensor, k: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, *,
              scale: float) -> torch.Tensor:
    """``lse_L [batch, heads]`` float32 (natural log) of ``q [batch, heads, 1, head_dim]`` over the keys
    ``index [batch, L]`` of ``k [batch, kv_heads, N, head_dim]`` (``valid`` marks the listed ones). Gathers only
    those ``L`` rows."""
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    rows = k.gather(2, index.view(batch, 1, -1, 1).expand(batch, kv_heads, index.shape[1], dim)).float()
    qg = q.float().view(batch, kv_heads, group, dim)
    scores = torch.einsum("bkgd,bkld->bkgl", qg, rows) * scale
    scores = scores.masked_fill(~valid.view(batch, 1, 1, -1), float("-inf"))
    return torch.logsumexp(scores, dim=-1).reshape(batch, heads)


def query_local_lse(q: torch.Tensor, k: torch.Tensor, *, n_keys: torch.Tensor | int, kv_start: torch.Tensor,
                    sink: int, window: int, scale: float) -> torch.Tensor:
    """``lse_L [batch, heads]`` float32 of the last query ``q`` over its local set (:func:`local_index`)."""
    index, valid = local_index(n_keys, kv_start, sink=sink, window=window)
    return local_lse(q, k, index, valid, scale=scale)


def gaussian_log_bulk_mass(q: torch.Tensor, moments: KeyMoments, n_bulk: torch.Tensor, *,
                           scale: float) -> torch.Tensor:
    """``log m̂_B [batch, heads]`` float32: ``log n_B + s qᵀμ + s² qᵀΣq / 2`` with ``μ, Σ`` the moments' mean and
    covariance (``-inf`` where ``n_B = 0``; ``μ = 0, Σ = 0`` where the moments hold no key)."""
    batch, heads, _, dim = q.shape
    kv_heads = moments.first.shape[1]
    group = heads // kv_heads
    qg = q.float().view(batch, kv_heads, group, dim)
    count = moments.count.clamp(min=1.0).view(batch, 1, 1)
    mean_dot = torch.einsum("bkgd,bkd->bkg", qg, moments.first) / count  # q·μ
    if moments.diagonal:
        second = torch.einsum("bkgd,bkd->bkg", qg * qg, moments.second) / count
        var = second - torch.einsum("bkgd,bkd->bkg", qg * qg, (moments.first / count) ** 2)
    else:
        second = torch.einsum("bkgd,bkde,bkge->bkg", qg, moments.second, qg) / count
        var = second - mean_dot * mean_dot
    has = (moments.count > 0).view(batch, 1, 1)
    mean_dot = torch.where(has, mean_dot, 0.0)
    var = torch.where(has, var.clamp(min=0.0), 0.0)
    log_n = torch.log(n_bulk.clamp(min=0.0)).view(batch, 1, 1)  # -inf for an empty bulk
    return (log_n + scale * mean_dot + 0.5 * scale * scale * var).reshape(batch, heads)


def predicted_far_share(q: torch.Tensor, k: torch.Tensor, moments: KeyMoments, *, n_keys: torch.Tensor | int,
                        kv_start: torch.Tensor, sink: int, window: int, scale: float | None = None,
                        lse: torch.Tensor | None = None) -> torch.Tensor:
    """QAdA's ``f̂ [batch, heads]`` float32 for ``q [batch, heads, 1, head_dim]`` (the last of ``n_keys`` keys of
    ``k [batch, kv_heads, N, head_dim]``), given the moments of the bulk (or of the window) for that query.
    ``lse``: the local log-sum-exp when already computed (:func:`query_local_lse`)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if lse is None:
        lse = query_local_lse(q, k, n_keys=n_keys, kv_start=kv_start, sink=sink, window=window, scale=scale)
    log_bulk = gaussian_log_bulk_mass(q, moments, bulk_count(n_keys, kv_start, sink=sink, window=window),
                                      scale=scale)
    return torch.sigmoid(log_bulk - lse).nan_to_num(0.0)


def exact_far_share(q: torch.Tensor, k: torch.Tensor, *, n_keys: torch.Tensor | int, kv_start: torch.Tensor,
                    sink: int, window: int, scale: float | None = None) -> torch.Tensor:
    """The oracle: the true share ``f [batch, heads]`` float32 of ``q``'s attention mass on the bulk, from every
    key's score (``[batch, heads, N]``, dense; evaluation only)."""
    batch, heads, _, dim = q.shape
    kv_heads, big_n = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    idx = torch.arange(big_n, device=q.device).view(1, -1)
    n = _on_device(n_keys, q.device).view(-1, 1)
    start = kv_start.long().view(-1, 1)
    real = (idx >= start) & (idx < n)
    bulk = real & (idx >= start + sink) & (idx < n - window)
    scores = torch.einsum("bkgd,bknd->bkgn", q.float().view(batch, kv_heads, group, dim), k.float()) * scale
    scores = scores.masked_fill(~real.view(batch, 1, 1, -1), float("-inf"))
    total = torch.logsumexp(scores, dim=-1)
    far = torch.logsumexp(scores.masked_fill(~bulk.view(batch, 1, 1, -1), float("-inf")), dim=-1)
    return torch.exp(far - total).nan_to_num(0.0).reshape(batch, heads)


def group_max(share: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[batch, heads]`` -> ``[batch, kv_heads]``: the largest share among each KV head's query heads."""
    batch, heads = share.shape
    return share.view(batch, kv_heads, heads // kv_heads).amax(-1)


def route_local(share: torch.Tensor, tau: float | torch.Tensor, kv_heads: int) -> torch.Tensor:
    """bool ``[batch, kv_heads]``: True (sink + window is enough) where every query head of the KV head has a far
    share ``<= tau`` (``share [batch, heads]``; ``tau`` a float or a tensor broadcastable to ``[batch,
    kv_heads]``)."""
    return group_max(share, kv_heads) <= tau


def random_local(batch: int, kv_heads: int, share: float, *, generator: torch.Generator | None = None,
                 device=None) -> torch.Tensor:
    """bool ``[batch, kv_heads]``: each (sequence, KV head) routed local with probability ``share``."""
    if not 0.0 <= share <= 1.0:
        raise LightTransferError(f"routing_share must be in [0, 1], got {share!r}.")
    return torch.rand(batch, kv_heads, generator=generator, device=device) < share


__all__ = ["KeyMoments", "accumulate", "move_range", "range_weight", "local_index", "bulk_count", "local_lse",
           "query_local_lse",
           "gaussian_log_bulk_mass", "predicted_far_share", "exact_far_share", "group_max", "route_local",
           "random_local", "STATS_SOURCES", "COVARIANCES"]
