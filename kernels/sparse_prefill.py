"""Public entry point of block-sparse prefill attention, and its plain PyTorch reference.

The rule (which key blocks a query block visits, causal inside them) is :mod:`.block_lists`; the Triton kernel is
:mod:`.sparse_prefill_triton`. The reference walks the query blocks one by one and gathers only the listed key
blocks, so its memory is ``O(batch * heads * block_q * max_blocks * block_k)`` per step, never ``n x N``; its time
is ``O(n * kept keys)`` matmul work plus one Python step per query block (fine on the CPU for the runtime's
moderate lengths, slow at 128k).
"""

from __future__ import annotations

import math

import torch

from ..errors import LightTransferError
from .attention import check_qkv, check_triton_support
from .block_lists import BlockLists, check_lists
from .switch import triton_runs_on


def block_sparse_attention_reference(q, k, v, lists: BlockLists, *, kv_start: torch.Tensor | None = None,
                                     scale: float | None = None, return_lse: bool = False,
                                     compute_dtype: torch.dtype = torch.float32):
    """Block-sparse attention by gathering each query block's listed key blocks (see ``block_sparse_attention``).

    ``compute_dtype``: dtype of the matmuls (float32 for the reference; the inputs' dtype gives the low-precision
    baseline of the kernel error policy). The softmax runs in float32.
    Returns ``o [B, H, n, D]`` in ``q.dtype`` and, with ``return_lse``, ``lse [B, H, n]`` float32, natural log, ``-inf`` for rows that see nothing.
    """
    batch, heads, n, dim = q.shape
    n_kv = k.shape[2]
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    group = heads // k.shape[1]
    list_group = heads // lists.indices.shape[1]
    bq, bk = lists.block_q, lists.block_k
    idx_all = lists.indices.to(q.device).long()
    cnt_all = lists.counts.to(q.device).long()
    kv_of_head = torch.arange(heads, device=q.device) // group
    list_of_head = torch.arange(heads, device=q.device) // list_group
    start = None if kv_start is None else kv_start.to(q.device).long().view(batch, 1, 1, 1)
    out = torch.zeros(batch, heads, n, dim, dtype=torch.float32, device=q.device)
    lse = torch.full((batch, heads, n), float("-inf"), dtype=torch.float32, device=q.device)
    offs_k = torch.arange(bk, device=q.device)
    b_idx = torch.arange(batch, device=q.device).view(batch, 1, 1)
    kvh_idx = kv_of_head.view(1, heads, 1)
    for qb in range(lists.q_blocks):
        rows = slice(qb * bq, min(n, qb * bq + bq))
        cnt = cnt_all[:, :, qb][:, list_of_head]  # [B, H]
        width = max(int(cnt.max().item()), 1)
        idx = idx_all[:, :, qb, :width][:, list_of_head]  # [B, H, width]
        pos = (idx.clamp(min=0).unsqueeze(-1) * bk + offs_k).flatten(2)  # [B, H, width * bk] key indices
        listed = (torch.arange(width, device=q.device).view(1, 1, -1) < cnt.unsqueeze(-1))
        listed = listed.repeat_interleave(bk, dim=2) & (pos < n_kv)
        pos = pos.clamp(max=n_kv - 1)
        kg = k[b_idx, kvh_idx, pos].to(compute_dtype)  # [B, H, width * bk, D]
        vg = v[b_idx, kvh_idx, pos].to(compute_dtype)
        qi = torch.arange(rows.start, rows.stop, device=q.device).view(1, 1, -1, 1) + lists.q_offset
        visible = listed.unsqueeze(2) & (pos.unsqueeze(2) <= qi)
        if start is not None:
            visible = visible & (pos.unsqueeze(2) >= start)
        scores = (torch.matmul(q[:, :, rows].to(compute_dtype), kg.transpose(-1, -2)) * scale).float()
        scores = scores.masked_fill(~visible, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)
        safe = torch.where(torch.isfinite(row_lse), row_lse, torch.zeros_like(row_lse))
        probs = torch.exp(scores - safe.unsqueeze(-1))
        out[:, :, rows] = torch.matmul(probs.to(compute_dtype), vg).float()
        lse[:, :, rows] = row_lse
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
    if not triton_runs_on(q):
        return block_sparse_attention_reference(q, k, v, lists, kv_start=kv_start, scale=scale,
                                                return_lse=return_lse)
    check_triton_support("block_sparse_attention", q)
    from .sparse_prefill_triton import block_sparse_attention_triton

    o, lse = block_sparse_attention_triton(q, k, v, lists, kv_start=kv_start, scale=scale, return_lse=return_lse)
    return (o, lse) if return_lse else o


__all__ = ["block_sparse_attention", "block_sparse_attention_reference"]
