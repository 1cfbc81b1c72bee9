"""Public entry point of the full-layer decode kernel, dispatched to Triton or the reference like the others.

A full layer's decode step is one new query per sequence against the layer's whole contiguous cache; it is
bound by reading the cache once (``2 * kv_heads * N * head_dim`` elements per sequence, see ``NOTES.md``). The
Triton kernel (:mod:`.full_decode_triton`) reads each K/V tile once for all query heads of its KV head (GQA) and
splits the key axis over programs (flash-decoding), merging the parts by log-sum-exp.
"""

from __future__ import annotations

import math

import torch

from ..errors import LightTransferError
from .attention import MAX_HEAD_DIM, SUPPORTED_DTYPES
from .reference import full_decode_reference
from .switch import triton_runs_on


def full_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kv_start: torch.Tensor | None = None,
    scale: float | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Attention of one new query per sequence against every cached key (a full layer's decode step).

    Args:
        q: ``[batch, heads, 1, head_dim]`` (any strides; the last dim is made contiguous if it is not).
        k, v: ``[batch, kv_heads, N, head_dim]``, ``kv_heads`` divides ``heads`` (GQA: query head ``h`` reads KV
            head ``h // (heads // kv_heads)``, never repeated in memory); any strides with a contiguous last dim,
            e.g. views of the first ``N`` tokens of preallocated storage. The query sees all ``N`` keys (it is
            the last of them, causal attention needs no mask).
        kv_start: int ``[batch]`` left padding per sequence (default 0): keys ``j < kv_start[b]`` are invisible.
            A sequence with ``kv_start[b] >= N`` sees nothing and gets zeros.
        scale: softmax scale, default ``1 / sqrt(head_dim)``.
        splits: chunks of the key axis per (sequence, KV head) (Triton path only; default: enough to fill the
            GPU). For tests.

    Returns:
        ``o [batch, heads, 1, head_dim]`` in ``q.dtype``.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise LightTransferError(f"full_decode: q, k and v must be 4-D [batch, heads, seq, head_dim]; got "
                                 f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}.")
    if q.shape[2] != 1:
        raise LightTransferError(f"full_decode: one query per sequence, got {q.shape[2]} (q {tuple(q.shape)}).")
    if k.shape != v.shape:
        raise LightTransferError(f"full_decode: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}.")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise LightTransferError(f"full_decode: batch or head_dim of q {tuple(q.shape)} does not match k "
                                 f"{tuple(k.shape)}.")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise LightTransferError(f"full_decode: {k.shape[1]} KV heads must divide {q.shape[1]} query heads.")
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise LightTransferError(f"full_decode: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast "
                                 "them to one dtype.")
    if kv_start is not None and tuple(kv_start.shape) != (q.shape[0],):
        raise LightTransferError(f"full_decode: kv_start must be [batch] = [{q.shape[0]}], got "
                                 f"{tuple(kv_start.shape)}.")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not triton_runs_on(q):
        return full_decode_reference(q, k, v, kv_start=kv_start, scale=scale)
    if q.dtype not in SUPPORTED_DTYPES:
        raise LightTransferError(f"full_decode: dtype {q.dtype} is not supported by the Triton kernel (use "
                                 "float16, bfloat16 or float32, or force the reference with use_reference()).")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise LightTransferError(f"full_decode: head_dim {q.shape[-1]} exceeds the kernel's limit of "
                                 f"{MAX_HEAD_DIM} (force the reference with use_reference()).")
    from .full_decode_triton import full_decode_triton

    return full_decode_triton(q, k, v, kv_start=kv_start, scale=scale, splits=splits)


__all__ = ["full_decode"]
