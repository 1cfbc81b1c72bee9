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
from .attention import check_qkv, check_triton_support
from .reference import full_decode_reference
from .switch import triton_runs_on


def full_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kv_start: torch.Tensor | None = None,
    scale: float | None = None,
    n_valid: torch.Tensor | None = None,
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
        n_valid: int tensor ``[1]`` on ``q``'s device: only keys ``j < n_valid`` exist (the rest of ``k``/``v`` is
            reserved storage, never read on the Triton path). Read in device memory, never on the host, so that a
            CUDA graph captured once serves every length up to ``N``. Default: all ``N`` keys.
        splits: chunks of the key axis per (sequence, KV head) (Triton path only; default: enough to fill the
            GPU). For tests.

    Returns:
        ``o [batch, heads, 1, head_dim]`` in ``q.dtype``.
    """
    check_qkv("full_decode", q, k, v)
    if q.shape[2] != 1:
        raise LightTransferError(f"full_decode: one query per sequence, got {q.shape[2]} (q {tuple(q.shape)}).")
    if kv_start is not None and tuple(kv_start.shape) != (q.shape[0],):
        raise LightTransferError(f"full_decode: kv_start must be [batch] = [{q.shape[0]}], got "
                                 f"{tuple(kv_start.shape)}.")
    if n_valid is not None and (n_valid.numel() != 1 or n_valid.dtype not in (torch.int32, torch.int64)):
        raise LightTransferError(f"full_decode: n_valid must be one int32/int64 element, got "
                                 f"{tuple(n_valid.shape)} {n_valid.dtype}.")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not triton_runs_on(q):
        return full_decode_reference(q, k, v, kv_start=kv_start, scale=scale, n_valid=n_valid)
    check_triton_support("full_decode", q)
    from .full_decode_triton import full_decode_triton

    return full_decode_triton(q, k, v, kv_start=kv_start, scale=scale, n_valid=n_valid, splits=splits)


__all__ = ["full_decode"]
