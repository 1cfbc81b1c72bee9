"""TokenSelect's Selection Cache lookup at a decode step: which sequences reuse their cached selection, with the
anchors moved for those that do not, in one launch.

The rule (Wu et al., arXiv 2411.02886, Sec. 3.3, as :mod:`lighttransfer.runtime.token_select` states it), per
sequence ``b`` with its decode query flattened over the heads, ``q_b [H * D]`` (post-RoPE), its anchor ``a_b [H * D]``
float32 (the query the cached selection was made with) made at key index ``m_b``, the query at key index ``p``:

* similar: ``cos(q_b, a_b) = q_b · a_b / (max(|q_b|, eps) max(|a_b|, eps)) >= reuse`` (``eps = 1e-8``, as
  ``torch.nn.functional.cosine_similarity`` clamps each norm), or forced to ``True``/``False`` (``force``, benchmarks);
* young: ``p - m_b <= max_age``;
* hit: similar and young. A miss makes this query the anchor: ``a_b = q_b`` (float32), ``m_b = p``. With
  ``previous`` (the paper's consecutive-query rule) ``a_b`` is the query compared with rather than the selection's:
  every lookup writes ``a_b = q_b``, hit or miss, and only a miss moves ``m_b``.

Counts, when a counter (int64 ``[2]``: lookups, hits) is given: ``+B`` lookups and ``+hits``, on the device.

A hit keeps its anchor and its key index, so the list kernel that follows (which reads ``m_b`` for the hits'
recent window) sees the same values before and after the update; the miss rows' ``m_b`` is not read there.
In the decode step this one launch stands for about fourteen small ones (the flattening copy, the cosine's
reductions, the two comparisons, two ``where`` + ``copy_`` pairs, the counter's three), which at batch 1 cost more
than the bytes they touch.
"""

from __future__ import annotations

import torch

from ..errors import LightTransferError
from .switch import triton_runs_on

COSINE_EPS = 1e-8


def _positions(pos: int | None, n_valid: torch.Tensor | None, batch: int, device) -> torch.Tensor:
    """int64 ``[B]``: the query's key index, ``pos`` or (a static step) ``n_valid - 1`` on the device."""
    if n_valid is not None:
        return (n_valid.to(device=device, dtype=torch.long).reshape(-1)[:1] - 1).expand(batch)
    return torch.full((batch,), int(pos), dtype=torch.long, device=device)


def _check_position(pos, n_valid) -> None:
    if (pos is None) == (n_valid is None):
        raise LightTransferError("selection_lookup: pass the query's key index as pos (an int) or, for a static "
                                 "step, n_valid (int [1] on the device), not both.")


def selection_lookup_reference(q: torch.Tensor, anchor: torch.Tensor, anchor_pos: torch.Tensor,
                               pos: int | None = None, *, reuse: float, max_age: int, force: bool | None = None,
                               counter: torch.Tensor | None = None, n_valid: torch.Tensor | None = None,
                               previous: bool = False) -> torch.Tensor:
    """The rule in plain PyTorch: ``q [B, H, 1, D]``, ``anchor [B, H * D]`` float32 and ``anchor_pos [B]`` int64
    (updated in place), the query at key index ``pos`` or ``n_valid - 1``; returns ``hit [B]`` bool."""
    _check_position(pos, n_valid)
    batch = q.shape[0]
    query = q.transpose(1, 2).reshape(batch, -1).float()
    if force is None:
        similar = torch.nn.functional.cosine_similarity(query, anchor, dim=-1, eps=COSINE_EPS) >= reuse
    else:
        similar = torch.full((batch,), bool(force), dtype=torch.bool, device=q.device)
    p = _positions(pos, n_valid, batch, q.device)
    hit = similar & (p - anchor_pos <= max_age)
    anchor.copy_(query if previous else torch.where(hit[:, None], anchor, query))
    anchor_pos.copy_(torch.where(hit, anchor_pos, p))
    if counter is not None:
        counter[0] += batch
        counter[1] += hit.sum()
    return hit


def selection_lookup(q: torch.Tensor, anchor: torch.Tensor, anchor_pos: torch.Tensor, pos: int | None = None, *,
                     reuse: float, max_age: int, force: bool | None = None, counter: torch.Tensor | None = None,
                     n_valid: torch.Tensor | None = None, previous: bool = False) -> torch.Tensor:
    """The Selection Cache lookup of one decode query per sequence (see the module docstring): ``hit [B]`` bool,
    ``anchor`` / ``anchor_pos`` moved to this query where it missed, ``counter`` (int64 ``[2]``) counted; no host
    synchronization, one launch on the Triton path (CUDA, or the CPU under ``TRITON_INTERPRET=1``).

    ``q [B, H, 1, D]`` any float dtype and strides; ``anchor [B, H * D]`` float32 contiguous; ``anchor_pos [B]``
    int64; the query's key index: ``pos`` (an int) or ``n_valid - 1`` (``n_valid``: int ``[1]`` on the device, a
    static step's live length). ``previous``: ``anchor`` holds the previous query (written at every lookup), not
    the selection's. The flags are bool viewing int8 storage (``.view(torch.int8)`` is free)."""
    _check_position(pos, n_valid)
    if q.dim() != 4 or q.shape[2] != 1:
        raise LightTransferError(f"selection_lookup: q must be [batch, heads, 1, head_dim], got {tuple(q.shape)}.")
    batch, heads, _, dim = q.shape
    if tuple(anchor.shape) != (batch, heads * dim) or anchor.dtype != torch.float32 or not anchor.is_contiguous():
        raise LightTransferError(f"selection_lookup: anchor must be a contiguous float32 [{batch}, {heads * dim}], "
                                 f"got {tuple(anchor.shape)} {anchor.dtype}.")
    if tuple(anchor_pos.shape) != (batch,) or anchor_pos.dtype != torch.long:
        raise LightTransferError(f"selection_lookup: anchor_pos must be int64 [{batch}], got "
                                 f"{tuple(anchor_pos.shape)} {anchor_pos.dtype}.")
    if counter is not None and (tuple(counter.shape) != (2,) or counter.dtype != torch.long):
        raise LightTransferError("selection_lookup: counter must be int64 [2] (lookups, hits).")
    if not triton_runs_on(q):
        return selection_lookup_reference(q, anchor, anchor_pos, pos, reuse=reuse, max_age=max_age, force=force,
                                          counter=counter, n_valid=n_valid, previous=previous)
    from .selection_cache_triton import selection_lookup_triton

    return selection_lookup_triton(q, anchor, anchor_pos, pos, reuse=float(reuse), max_age=int(max_age),
                                   force=force, counter=counter, eps=COSINE_EPS, n_valid=n_valid,
                                   previous=bool(previous))


__all__ = ["selection_lookup", "selection_lookup_reference", "COSINE_EPS"]
