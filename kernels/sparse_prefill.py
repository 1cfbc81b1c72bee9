"""Public entry point of block-sparse prefill attention, and its plain PyTorch reference.

The rule (which key blocks a query block visits, causal inside them) is :mod:`.block_lists`; the Triton kernel is
:mod:`.sparse_prefill_triton`. The reference expands the lists to an explicit element mask a few query blocks at
a time, so its memory is ``O(rows_per_step * N)``, never ``n x N``; its time is that of dense attention (fine on
the CPU at the runtime's moderate lengths, slow at 128k, where the kernel runs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import LightTransferError
from .attention import check_qkv, check_triton_support
from .block_lists import BlockLists, check_lists, keep_mask
from .switch import triton_runs_on

# score elements per reference step (fp32): 16M = 64 MB
REFERENCE_STEP_ELEMENTS = 1 << 24
# rows of a packed kernel tile at most (kept here, not imported from the Triton module, which needs triton)
MAX_PACKED_ROWS = 256


def can_pack(heads: int, kv_heads: int, lists: BlockLists) -> bool:
    """Whether the kernel can run ``lists`` packed: one list per KV head, ``GROUP > 1``, and the group's
    ``GROUP * block_q`` rows (to a power of two) within :data:`MAX_PACKED_ROWS`."""
    group = heads // kv_heads
    rows = 1 << max(group * lists.block_q - 1, 0).bit_length()
    return group > 1 and lists.indices.shape[1] == kv_heads and rows <= MAX_PACKED_ROWS


def _step_mask(keep, lists: BlockLists, qb0: int, qb1: int, n: int, n_kv: int, start) -> torch.Tensor:
    """bool ``[B, H, rows, N]``: the listed blocks of query blocks ``[qb0, qb1)`` as elements, causal, without
    the left padding."""
    bq, bk = lists.block_q, lists.block_k
    r0, r1 = qb0 * bq, min(n, qb1 * bq)
    visible = keep[:, :, qb0:qb1].repeat_interleave(bq, dim=2)[:, :, : r1 - r0]
    visible = visible.repeat_interleave(bk, dim=3)[..., :n_kv]
    k_idx = torch.arange(n_kv, device=keep.device).view(1, 1, 1, -1)
    q_idx = torch.arange(r0, r1, device=keep.device).view(1, 1, -1, 1) + lists.q_offset
    visible = visible & (k_idx <= q_idx)
    if start is not None:
        visible = visible & (k_idx >= start)
    return visible


def block_sparse_attention_sdpa(q, k, v, lists: BlockLists, *, kv_start: torch.Tensor | None = None,
                                scale: float | None = None) -> torch.Tensor:
    """The runtime's CPU path: PyTorch SDPA (its fused CPU kernel) under the same step masks as the reference.

    A row that sees nothing (a padding query) sees its own key instead, as the runtime's dense padding mask does,
    so every row stays finite. Returns ``[B, H, n, D]`` in ``q.dtype``."""
    batch, heads, n, _ = q.shape
    n_kv = k.shape[2]
    keep = keep_mask(lists.to(q.device)).repeat_interleave(heads // lists.indices.shape[1], dim=1)
    start = None if kv_start is None else kv_start.to(q.device).long().view(batch, 1, 1, 1)
    out = torch.empty_like(q)
    blocks_per_step = max(1, REFERENCE_STEP_ELEMENTS // max(batch * heads * lists.block_q * n_kv, 1))
    for qb0 in range(0, lists.q_blocks, blocks_per_step):
        qb1 = min(lists.q_blocks, qb0 + blocks_per_step)
        r0, r1 = qb0 * lists.block_q, min(n, qb1 * lists.block_q)
        visible = _step_mask(keep, lists, qb0, qb1, n, n_kv, start)
        own = torch.arange(n_kv, device=q.device).view(1, 1, 1, -1) == \
            torch.arange(r0, r1, device=q.device).view(1, 1, -1, 1) + lists.q_offset
        visible = torch.where(visible.any(-1, keepdim=True), visible, own)
        out[:, :, r0:r1] = F.scaled_dot_product_attention(q[:, :, r0:r1], k, v, attn_mask=visible, scale=scale,
                                                          enable_gqa=True)
    return out


def block_sparse_attention_reference(q, k, v, lists: BlockLists, *, kv_start: torch.Tensor | None = None,
                                     scale: float | None = None, return_lse: bool = False,
                                     compute_dtype: torch.dtype = torch.float32):
    """Block-sparse attention under an explicit mask expanded from the lists (see ``block_sparse_attention``).

    Query rows go in steps of whole query blocks (``rows_per_step``: as many as keep a step's scores under
    :data:`REFERENCE_STEP_ELEMENTS`); each step expands its blocks' keep mask to elements ``[B, H, rows, N]``, so
    memory stays ``O(rows_per_step * N)``, never ``n x N``. Time is that of dense attention (every score of a step
    is computed, then masked): a reference, not a fast path. GQA without repeating K/V (queries viewed per KV
    head). ``compute_dtype``: dtype of the matmuls (float32 for the reference; the inputs' dtype gives the
    low-precision baseline of the kernel error policy); the softmax runs in float32.

    Returns ``o [B, H, n, D]`` in ``q.dtype`` and, with ``return_lse``, ``lse [B, H, n]`` float32, natural log,
    ``-inf`` (and ``o = 0``) for rows that see nothing.
    """
    batch, heads, n, dim = q.shape
    kv_heads, n_kv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    group = heads // kv_heads
    bq = lists.block_q
    keep = keep_mask(lists.to(q.device)).repeat_interleave(heads // lists.indices.shape[1], dim=1)  # [B,H,QB,KB]
    kc, vc = k.to(compute_dtype), v.to(compute_dtype)
    start = None if kv_start is None else kv_start.to(q.device).long().view(batch, 1, 1, 1)
    out = torch.zeros(batch, heads, n, dim, dtype=torch.float32, device=q.device)
    lse = torch.full((batch, heads, n), float("-inf"), dtype=torch.float32, device=q.device)
    blocks_per_step = max(1, REFERENCE_STEP_ELEMENTS // max(batch * heads * bq * n_kv, 1))
    for qb0 in range(0, lists.q_blocks, blocks_per_step):
        qb1 = min(lists.q_blocks, qb0 + blocks_per_step)
        r0, r1 = qb0 * bq, min(n, qb1 * bq)
        visible = _step_mask(keep, lists, qb0, qb1, n, n_kv, start)
        rows = r1 - r0
        qc = q[:, :, r0:r1].to(compute_dtype).reshape(batch, kv_heads, group * rows, dim)
        scores = (torch.matmul(qc, kc.transpose(-1, -2)).float() * scale).view(batch, heads, rows, n_kv)
        scores = scores.masked_fill(~visible, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)
        safe = torch.where(torch.isfinite(row_lse), row_lse, torch.zeros_like(row_lse))
        probs = torch.exp(scores - safe.unsqueeze(-1)).to(compute_dtype).view(batch, kv_heads, group * rows, n_kv)
        out[:, :, r0:r1] = torch.matmul(probs, vc).float().view(batch, heads, rows, dim)
        lse[:, :, r0:r1] = row_lse
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lists: BlockLists,
    *,
    kv_start: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    pack_gqa: bool | None = None,
):
    """Causal attention of ``n`` queries over the key blocks their query block lists (block-sparse prefill).

    Args:
        q: ``[batch, heads, n, head_dim]``; any strides (the last dim is made contiguous if it is not).
        k, v: ``[batch, kv_heads, N, head_dim]``, ``kv_heads`` divides ``heads`` (GQA: query head ``h`` reads KV
            head ``h // (heads // kv_heads)``, never repeated in memory).
        lists: :class:`~.block_lists.BlockLists` for these shapes (one list per query head or per KV head; they
            must already hold the sink and local band, as the selectors' lists do). Query ``i`` sits at key index
            ``lists.q_offset + i``.
        kv_start: int ``[batch]`` left padding: keys ``j < kv_start[b]`` are invisible.
        scale: softmax scale, default ``1 / sqrt(head_dim)``.
        return_lse: also return the log-sum-exp of the scaled scores.
        pack_gqa: the kernel's packed layout (one program per KV head and query block, its ``GROUP`` query heads
            stacked as tile rows, so each listed K/V tile is loaded once per KV head): needs lists per KV head and
            a tile of ``GROUP * block_q`` rows (to a power of two) at most
            :data:`~.sparse_prefill_triton.MAX_PACKED_ROWS`. ``None`` packs whenever that holds and ``GROUP > 1``.
            The result is the same either way (the layout changes only the work order).

    Returns:
        ``o [batch, heads, n, head_dim]`` in ``q.dtype``, or ``(o, lse)`` with ``lse [batch, heads, n]`` float32 in
        NATURAL log base (``-inf`` and ``o = 0`` for a row that sees no key). With every causal block listed
        (:func:`~.block_lists.dense_lists`) this is dense causal attention.
    """
    check_qkv("block_sparse_attention", q, k, v)
    check_lists("block_sparse_attention", lists, q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2])
    if lists.q_offset < 0:
        raise LightTransferError(f"block_sparse_attention: q_offset must be >= 0, got {lists.q_offset}.")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    pack = can_pack(q.shape[1], k.shape[1], lists)
    if pack_gqa and not pack:
        raise LightTransferError(
            f"block_sparse_attention: pack_gqa needs lists per KV head ({k.shape[1]}, got {lists.indices.shape[1]}) "
            f"and {q.shape[1] // k.shape[1]} heads x block_q {lists.block_q} rows <= {MAX_PACKED_ROWS}; pass "
            f"pack_gqa=None or False.")
    pack = pack if pack_gqa is None else bool(pack_gqa)
    if not triton_runs_on(q):
        return block_sparse_attention_reference(q, k, v, lists, kv_start=kv_start, scale=scale,
                                                return_lse=return_lse)
    check_triton_support("block_sparse_attention", q)
    from .sparse_prefill_triton import block_sparse_attention_triton

    o, lse = block_sparse_attention_triton(q, k, v, lists, kv_start=kv_start, scale=scale, return_lse=return_lse,
                                           pack=pack)
    return (o, lse) if return_lse else o


__all__ = ["block_sparse_attention", "can_pack", "MAX_PACKED_ROWS", "block_sparse_attention_reference", "block_sparse_attention_sdpa"]
