"""Plain PyTorch references for the streaming kernels: an explicit dense mask, computed in float32.

They define what the Triton kernels must compute (same signatures, same outputs) and run anywhere. Memory is
``O(batch * heads * n * N)``: for tests, A/B checks and short inputs only.
"""

from __future__ import annotations

import math

import torch

from .mask import causal_visible, streaming_visible


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor,
    scale: float,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention under an explicit mask.

    ``q [B,H,n,D]``, ``k/v [B,Hkv,N,D]`` (GQA: repeated here, in the reference only), ``visible [B,H,n,N]`` bool.
    Matmuls run in ``compute_dtype`` (float32 for the reference; the inputs' own dtype gives the low-precision
    baseline of the error policy), the softmax in float32.
    Returns ``(o [B,H,n,D] float32, lse [B,H,n] float32, natural log, -inf for rows that see nothing)``.
    """
    group = q.shape[1] // k.shape[1]
    k = k.to(compute_dtype).repeat_interleave(group, dim=1)
    v = v.to(compute_dtype).repeat_interleave(group, dim=1)
    scores = (torch.matmul(q.to(compute_dtype), k.transpose(-1, -2)) * scale).float()
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # a row with no visible key has lse=-inf: give it zero weights instead of nan
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - safe.unsqueeze(-1))
    return torch.matmul(probs.to(compute_dtype), v).float(), lse


def _head_modes(stream_heads: torch.Tensor | None, heads: int, device) -> torch.Tensor:
    if stream_heads is None:
        return torch.ones(heads, dtype=torch.bool, device=device)
    return stream_heads.to(device=device, dtype=torch.bool).reshape(heads)


def prefill_visibility(
    batch: int,
    heads: int,
    n: int,
    n_kv: int,
    *,
    sink: int,
    window: int,
    q_offset: int = 0,
    kv_start: torch.Tensor | None = None,
    kv_len: torch.Tensor | None = None,
    stream_heads: torch.Tensor | None = None,
    device=None,
) -> torch.Tensor:
    """Dense mask ``[batch, heads, n, n_kv]`` (True = attend) of :func:`streaming_attention_reference`."""
    start = torch.zeros(batch, dtype=torch.long, device=device) if kv_start is None else kv_start.to(device).long()
    end = (torch.full((batch,), n_kv, dtype=torch.long, device=device) if kv_len is None
           else kv_len.to(device).long())
    idx_q = torch.arange(n, device=device) + q_offset  # [n]
    idx_k = torch.arange(n_kv, device=device)  # [N]
    q_pos = idx_q.view(1, n, 1) - start.view(batch, 1, 1)  # [B, n, 1]
    k_pos = idx_k.view(1, 1, n_kv) - start.view(batch, 1, 1)  # [B, 1, N]
    valid = (idx_k.view(1, 1, n_kv) >= start.view(batch, 1, 1)) & (idx_k.view(1, 1, n_kv) < end.view(batch, 1, 1))
    stream = streaming_visible(q_pos, k_pos, sink, window) & valid  # [B, n, N]
    full = causal_visible(q_pos, k_pos) & valid
    modes = _head_modes(stream_heads, heads, device).view(1, heads, 1, 1)
    return torch.where(modes, stream.unsqueeze(1), full.unsqueeze(1))


def decode_visibility(
    heads: int,
    slot_pos: torch.Tensor,
    q_pos: torch.Tensor,
    *,
    sink: int,
    window: int,
    stream_heads: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense mask ``[batch, heads, nq, C]`` of :func:`streaming_decode_reference` (slot_pos -1 = empty)."""
    sp = slot_pos.long().unsqueeze(1)  # [B, 1, C]
    qp = q_pos.to(slot_pos.device).long().unsqueeze(-1)  # [B, nq, 1]
    filled = sp >= 0
    stream = streaming_visible(qp, sp, sink, window) & filled  # [B, nq, C]
    full = causal_visible(qp, sp) & filled
    modes = _head_modes(stream_heads, heads, slot_pos.device).view(1, heads, 1, 1)
    return torch.where(modes, stream.unsqueeze(1), full.unsqueeze(1))


def streaming_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sink: int,
    window: int,
    q_offset: int = 0,
    kv_start: torch.Tensor | None = None,
    kv_len: torch.Tensor | None = None,
    scale: float | None = None,
    stream_heads: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """Sink + sliding-window attention with an explicit mask (see ``streaming_attention`` for the contract).

    Query ``i`` of sequence ``b`` sits at position ``q_offset + i - kv_start[b]``, key ``j`` at
    ``j - kv_start[b]``; keys outside ``[kv_start[b], kv_len[b])`` are padding. Streaming heads see keys with
    ``streaming_visible(q_pos, k_pos, sink, window)``, full heads (``stream_heads[h] == False``) every causal key.

    Returns ``o [B, H, n, D]`` in ``q.dtype`` and, with ``return_lse``, ``lse [B, H, n]`` float32 (natural log).
    """
    batch, heads, n, dim = q.shape
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    visible = prefill_visibility(batch, heads, n, k.shape[2], sink=sink, window=window, q_offset=q_offset,
                                 kv_start=kv_start, kv_len=kv_len, stream_heads=stream_heads, device=q.device)
    o, lse = masked_attention(q, k, v, visible, scale)
    o = o.to(q.dtype)
    return (o, lse) if return_lse else o


def streaming_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_pos: torch.Tensor,
    q_pos: torch.Tensor,
    *,
    sink: int,
    window: int,
    scale: float | None = None,
    stream_heads: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention over a slot cache whose slots carry absolute positions (see ``streaming_decode``).

    ``q [B, H, nq, D]``, ``k_cache/v_cache [B, Hkv, C, D]``, ``slot_pos [B, C]`` (-1 = empty slot),
    ``q_pos [B, nq]``. Returns ``o [B, H, nq, D]`` in ``q.dtype``.
    """
    heads, dim = q.shape[1], q.shape[3]
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    visible = decode_visibility(heads, slot_pos.to(q.device), q_pos, sink=sink, window=window,
                                stream_heads=stream_heads)
    o, _ = masked_attention(q, k_cache, v_cache, visible, scale)
    return o.to(q.dtype)


def full_decode_visibility(batch: int, heads: int, n_keys: int, kv_start: torch.Tensor | None = None,
                           device=None, n_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Dense mask ``[batch, heads, 1, N]`` of :func:`full_decode_reference`: key ``j`` is visible iff
    ``kv_start[b] <= j < n_valid`` (``n_valid``: an int tensor of one element, default ``N``)."""
    idx = torch.arange(n_keys, device=device).view(1, 1, 1, n_keys)
    visible = torch.ones(1, 1, 1, n_keys, dtype=torch.bool, device=device)
    if kv_start is not None:
        visible = idx >= kv_start.to(device).long().view(batch, 1, 1, 1)
    if n_valid is not None:
        visible = visible & (idx < n_valid.to(device).long().view(1, 1, 1, 1))
    return visible.expand(batch, heads, 1, n_keys)


def full_decode_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kv_start: torch.Tensor | None = None,
    scale: float | None = None,
    n_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention of a full layer (see ``full_decode``): one query per sequence, ``q [B, H, 1, D]``,
    against every key of a contiguous cache ``k/v [B, Hkv, N, D]`` from ``kv_start[b]`` on (keys before it are
    left padding) and before ``n_valid`` (default ``N``). Returns ``o [B, H, 1, D]`` in ``q.dtype`` (zeros for a
    sequence that sees no key)."""
    batch, heads, _, dim = q.shape
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    visible = full_decode_visibility(batch, heads, k.shape[2], kv_start, device=q.device, n_valid=n_valid)
    o, _ = masked_attention(q, k, v, visible, scale)
    return o.to(q.dtype)


__all__ = [
    "full_decode_reference",
    "full_decode_visibility",
    "streaming_attention_reference",
    "streaming_decode_reference",
    "masked_attention",
    "prefill_visibility",
    "decode_visibility",
]
