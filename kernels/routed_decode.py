"""Decode attention of a full layer with per-(sequence, KV head) routing: local heads read sink + window of the
full cache, full heads read every key, in one launch.

The keys are the full layer's history in index order (``[batch, kv_heads, N, head_dim]``, as for
:func:`~lighttransfer.kernels.full_decode`); the query is the last of the ``n`` keys that exist (``n = N``, or the
device-side ``n_valid`` of a static step). For a KV head routed local (``local[b, g]``), query heads of that KV head
see key ``j`` iff it is a sink or in the window under the rule of :mod:`.mask` at positions counted from
``kv_start[b]``: ``kv_start <= j < kv_start + sink`` or ``n - window <= j < n``. A full-routed head sees every key
``kv_start <= j < n``. The routing itself (QAdA, an oracle, random, static) is :mod:`.head_routing`'s.

The Triton kernel (:mod:`.routed_decode_triton`) is :mod:`.full_decode_triton`'s split-K kernel, with each program
clipping its key chunk to what its (sequence, KV head) sees: a local head's programs whose chunk lies wholly in the
bulk exit at once, so the time falls with the share routed local.
"""

from __future__ import annotations

import math

import torch

from ..errors import LightTransferError
from .attention import check_qkv, check_triton_support
from .mask import streaming_visible
from .reference import masked_attention
from .switch import triton_runs_on


def routed_visibility(batch: int, heads: int, n_keys: int, local: torch.Tensor, *, sink: int, window: int,
                      kv_start: torch.Tensor | None = None, n_valid: torch.Tensor | None = None,
                      device=None) -> torch.Tensor:
    """Dense mask ``[batch, heads, 1, N]`` of :func:`routed_decode_reference` (``local [batch, kv_heads]``)."""
    kv_heads = local.shape[1]
    idx = torch.arange(n_keys, device=device).view(1, 1, 1, n_keys)
    start = torch.zeros(batch, dtype=torch.long, device=device) if kv_start is None \
        else kv_start.to(device).long()
    n = torch.tensor(n_keys, device=device) if n_valid is None else n_valid.to(device).long().view(())
    start = start.view(batch, 1, 1, 1)
    real = (idx >= start) & (idx < n)
    near = streaming_visible(n - 1 - start, idx - start, sink, window)
    routed = local.to(device=device, dtype=torch.bool).repeat_interleave(heads // kv_heads, dim=1)
    return real & (near | ~routed.view(batch, heads, 1, 1))


def routed_decode_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, local: torch.Tensor, *, sink: int,
                            window: int, kv_start: torch.Tensor | None = None, scale: float | None = None,
                            n_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch (float32) :func:`routed_decode`; ``o [batch, heads, 1, head_dim]`` in ``q.dtype``."""
    batch, heads, _, dim = q.shape
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    visible = routed_visibility(batch, heads, k.shape[2], local, sink=sink, window=window, kv_start=kv_start,
                                n_valid=n_valid, device=q.device)
    o, _ = masked_attention(q, k, v, visible, scale)
    return o.to(q.dtype)


def routed_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, local: torch.Tensor, *, sink: int, window: int,
                  kv_start: torch.Tensor | None = None, scale: float | None = None,
                  n_valid: torch.Tensor | None = None, splits: int | None = None) -> torch.Tensor:
    """Attention of one new query per sequence, each KV head over sink + window or over every key as routed.

    Args:
        q: ``[batch, heads, 1, head_dim]``.
        k, v: ``[batch, kv_heads, N, head_dim]`` (GQA as in :func:`~lighttransfer.kernels.full_decode`).
        local: bool ``[batch, kv_heads]`` on ``q``'s device: True = that KV head's query heads attend sink +
            window only. Read on the device (no sync; a CUDA graph replays any routing).
        sink, window: keys a local head keeps (``sink >= 0``, ``window >= 1``).
        kv_start: int ``[batch]`` left padding (keys before it are invisible; sinks start there).
        scale: softmax scale, default ``1 / sqrt(head_dim)``.
        n_valid: int tensor ``[1]``: only keys ``j < n_valid`` exist (a static decode step), default ``N``.
        splits: chunks of the key axis per (sequence, KV head) (Triton only; tests).

    Returns:
        ``o [batch, heads, 1, head_dim]`` in ``q.dtype`` (zeros for a sequence that sees no key).
    """
    check_qkv("routed_decode", q, k, v)
    batch, _, n, _ = q.shape
    if n != 1:
        raise LightTransferError(f"routed_decode: one query per sequence, got {n} (q {tuple(q.shape)}).")
    if tuple(local.shape) != (batch, k.shape[1]) or local.dtype != torch.bool:
        raise LightTransferError(f"routed_decode: local must be bool [batch, kv_heads] = [{batch}, {k.shape[1]}], "
                                 f"got {tuple(local.shape)} {local.dtype}.")
    if sink < 0 or window < 1:
        raise LightTransferError(f"routed_decode: sink must be >= 0 and window >= 1, got {sink}, {window}.")
    if kv_start is not None and tuple(kv_start.shape) != (batch,):
        raise LightTransferError(f"routed_decode: kv_start must be [batch] = [{batch}], got {tuple(kv_start.shape)}.")
    if n_valid is not None and (n_valid.numel() != 1 or n_valid.dtype not in (torch.int32, torch.int64)):
        raise LightTransferError(f"routed_decode: n_valid must be one int32/int64 element, got "
                                 f"{tuple(n_valid.shape)} {n_valid.dtype}.")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not triton_runs_on(q):
        return routed_decode_reference(q, k, v, local, sink=sink, window=window, kv_start=kv_start, scale=scale,
                                       n_valid=n_valid)
    check_triton_support("routed_decode", q)
    from .routed_decode_triton import routed_decode_triton

    return routed_decode_triton(q, k, v, local, sink=int(sink), window=int(window), kv_start=kv_start, scale=scale,
                                n_valid=n_valid, splits=splits)


__all__ = ["routed_decode", "routed_decode_reference", "routed_visibility"]
