"""Public entry points: streaming attention for prefill and for decode, dispatched to Triton or the reference.

Both follow the sink + sliding-window rule of :mod:`lighttransfer.kernels.mask` (LightTransfer, arXiv
2410.13846, Sec. 3: a lazy layer keeps the first ``sink`` tokens and the ``window`` most recent ones).

Supported by the Triton path: float16, bfloat16 and float32 tensors (float32 matmuls in full IEEE precision),
any ``head_dim`` up to 256 (non-powers of two are padded inside the kernel). Anything else raises
:class:`~lighttransfer.errors.LightTransferError` rather than silently falling back to the reference, whose
memory grows with ``n * N`` and would fail far from the cause at long context. Use ``use_reference()`` to run
the reference on purpose.
"""

from __future__ import annotations

import math

import torch

from ..errors import LightTransferError
from .reference import streaming_attention_reference, streaming_decode_reference
from .switch import triton_runs_on

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def check_qkv(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """One-line errors for what every attention kernel needs of ``q [B, H, n, D]``, ``k, v [B, Hkv, N, D]``:
    4-D, matching batch and head_dim, ``Hkv`` dividing ``H``, one dtype."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise LightTransferError(f"{name}: q, k and v must be 4-D [batch, heads, seq, head_dim]; got "
                                 f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}.")
    if k.shape != v.shape:
        raise LightTransferError(f"{name}: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}.")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise LightTransferError(f"{name}: batch or head_dim of q {tuple(q.shape)} does not match k "
                                 f"{tuple(k.shape)}.")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise LightTransferError(f"{name}: {k.shape[1]} KV heads must divide {q.shape[1]} query heads.")
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise LightTransferError(f"{name}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them "
                                 "to one dtype.")


def _check_common(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: int, window: int,
                  stream_heads: torch.Tensor | None) -> None:
    check_qkv(name, q, k, v)
    if window < 1 or sink < 0:
        raise LightTransferError(f"{name}: need window >= 1 and sink >= 0, got sink={sink}, window={window}.")
    if stream_heads is not None and stream_heads.numel() != q.shape[1]:
        raise LightTransferError(f"{name}: stream_heads has {stream_heads.numel()} entries for {q.shape[1]} "
                                 "query heads.")


def check_triton_support(name: str, q: torch.Tensor) -> None:
    """One-line errors for what the Triton kernels cannot take: other dtypes, head_dim over the limit."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise LightTransferError(f"{name}: dtype {q.dtype} is not supported by the Triton kernel (use float16, "
                                 "bfloat16 or float32, or force the reference with use_reference()).")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise LightTransferError(f"{name}: head_dim {q.shape[-1]} exceeds the kernel's limit of {MAX_HEAD_DIM} "
                                 "(force the reference with use_reference()).")


def streaming_attention(
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
    """Sink + sliding-window attention of ``n`` queries against ``N`` keys (prefill, chunked prefill).

    Args:
        q: ``[batch, heads, n, head_dim]``; any strides (the last dim is made contiguous if it is not).
        k, v: ``[batch, kv_heads, N, head_dim]``, ``kv_heads`` divides ``heads`` (GQA: query head ``h`` reads KV
            head ``h // (heads // kv_heads)``; K/V are never repeated in memory).
        sink, window: query position ``p`` sees key positions ``< sink`` and in ``(p - window, p]``
            (``streaming_visible``), causal.
        q_offset: key index of query 0 (``N - n`` when the queries are the last ``n`` keys); any value >= 0.
        kv_start: int ``[batch]`` left padding per sequence (default 0). Key ``j`` sits at position
            ``j - kv_start[b]``, query ``i`` at ``q_offset + i - kv_start[b]``; keys before ``kv_start[b]`` are
            padding.
        kv_len: int ``[batch]`` end of the valid keys (default ``N``); keys ``>= kv_len[b]`` are padding.
        scale: softmax scale, default ``1 / sqrt(head_dim)``.
        stream_heads: bool ``[heads]``: True = the head streams (sink + window), False = full causal attention
            over all valid keys; default all streaming. One launch serves mixed layers.
        return_lse: also return the log-sum-exp of the scaled scores.

    Returns:
        ``o [batch, heads, n, head_dim]`` in ``q.dtype``, or ``(o, lse)`` with ``lse [batch, heads, n]`` float32
        in NATURAL log base (``-inf`` and ``o = 0`` for a row that sees no key, e.g. a padding row).
        Cost is ``O(n * (sink + window))`` key tiles: tiles outside the sink and the window are never read.
    """
    _check_common("streaming_attention", q, k, v, sink, window, stream_heads)
    if q_offset < 0:
        raise LightTransferError(f"streaming_attention: q_offset must be >= 0, got {q_offset}.")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    kwargs = dict(sink=int(sink), window=int(window), q_offset=int(q_offset), kv_start=kv_start, kv_len=kv_len,
                  scale=scale, stream_heads=stream_heads)
    if not triton_runs_on(q):
        return streaming_attention_reference(q, k, v, **kwargs, return_lse=return_lse)
    check_triton_support("streaming_attention", q)
    from .prefill_triton import streaming_attention_triton

    o, lse = streaming_attention_triton(q, k, v, **kwargs, return_lse=return_lse)
    return (o, lse) if return_lse else o


def streaming_decode(
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
    """Attention of a few new queries per sequence against a slot cache that records each slot's position.

    Args:
        q: ``[batch, heads, nq, head_dim]`` (``nq`` = 1 for plain decoding, a few for speculative/chunked steps).
        k_cache, v_cache: ``[batch, kv_heads, C, head_dim]``. For a streaming layer ``C = sink + window``
            (sink slots, then a ring buffer), but the kernel relies on ``slot_pos`` only, never on slot order.
        slot_pos: int32/int64 ``[batch, C]``: absolute position of each slot's token, -1 = empty.
        q_pos: int ``[batch, nq]``: absolute positions of the queries.
        sink, window, scale, stream_heads: as in :func:`streaming_attention` (a full head sees every filled slot
            with ``slot_pos <= q_pos``).

    Returns:
        ``o [batch, heads, nq, head_dim]`` in ``q.dtype`` (zeros for a query that sees no slot).
        Flash-decoding: the slots are split over programs so that batch 1 fills the GPU; all query heads of one
        KV head share each K/V tile.
    """
    _check_common("streaming_decode", q, k_cache, v_cache, sink, window, stream_heads)
    batch, _, nq, _ = q.shape
    if tuple(slot_pos.shape) != (batch, k_cache.shape[2]):
        raise LightTransferError(f"streaming_decode: slot_pos must be [batch, C] = {(batch, k_cache.shape[2])}, "
                                 f"got {tuple(slot_pos.shape)}.")
    if tuple(q_pos.shape) != (batch, nq):
        raise LightTransferError(f"streaming_decode: q_pos must be [batch, nq] = {(batch, nq)}, got "
                                 f"{tuple(q_pos.shape)}.")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    kwargs = dict(sink=int(sink), window=int(window), scale=scale, stream_heads=stream_heads)
    if not triton_runs_on(q):
        return streaming_decode_reference(q, k_cache, v_cache, slot_pos, q_pos, **kwargs)
    check_triton_support("streaming_decode", q)
    from .decode_triton import streaming_decode_triton

    return streaming_decode_triton(q, k_cache, v_cache, slot_pos, q_pos, **kwargs)


__all__ = ["streaming_attention", "streaming_decode", "check_qkv", "check_triton_support", "SUPPORTED_DTYPES",
           "MAX_HEAD_DIM"]
