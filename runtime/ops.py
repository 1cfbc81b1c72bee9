"""The attention primitives the runtime calls, each on the right backend.

Streaming attention goes to :mod:`lighttransfer.kernels`: the Triton kernels for CUDA tensors, the PyTorch
references for CPU tensors. (The references are called directly on the CPU: the Triton interpreter that the
public kernel entry points use for CPU tensors under ``TRITON_INTERPRET=1`` is a tool for testing kernels, far too
slow to run a model.) ``kernels.use_reference()`` forces the references on CUDA too.

Full attention goes to transformers' own SDPA attention, with an explicit mask only for left padding, except for a
decode step on CUDA (one query per sequence against the layer's whole cache), which goes to the GQA-aware split-K
kernel ``kernels.full_decode`` (the query heads of a KV head share each K/V tile; SDPA repeats nothing either, but
its decode path is not a flash-decoding one). A chunk of
queries after cached keys (chunked prefill) goes on CUDA to the prefill kernel with a window that spans every
key, i.e. causal attention at an offset: SDPA's ``is_causal`` puts the diagonal top-left, and the explicit
``[n, N]`` mask it would need keeps it off its flash kernel.

Shapes: queries ``[batch, heads, n, head_dim]``, keys/values ``[batch, kv_heads, N, head_dim]`` (GQA: never
repeated here), outputs ``[batch, heads, n, head_dim]`` in the queries' dtype.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .. import kernels

# query rows (queries x GQA group) per decode-kernel launch; its tile holds them all in shared memory
DECODE_TILE_ROWS = 64
# SDPA backends for full attention on CUDA. cuDNN is left out: it builds an execution plan per shape and the key
# length changes at every decode step. Measured on an H100 (torch 2.11): one SDPA call at a new key length costs
# 39 ms of host time with the default backends, 62 us without cuDNN; in a 135M hybrid the full layers spent
# ~3.5 ms each per decoded token (bench/results/runtime_decode_profile_h100*).
FULL_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# How a full layer prefills one unpadded pass (every query, causal) on CUDA: ``sdpa-flash`` (SDPA's flash kernel,
# FlashAttention-2), ``sdpa-cudnn`` (SDPA with cuDNN allowed: one plan per prompt length, built once per length, as
# stock transformers does) or ``triton`` (our prefill kernel with a window spanning every key: causal). Chosen with
# :func:`full_prefill_backend`; measured side by side by ``bench/scripts/prefill_floor.py``.
# ``auto`` (the default) takes cuDNN from CUDNN_PREFILL_MIN_TOKENS on, where its per-length plan (tens of ms of host
# time, once per prompt length) is small beside the prefill, and SDPA's flash kernel below. Measured on an H200,
# Llama-3-8B shape, 32k tokens, ratio-0.5 hybrid: sdpa-flash 1356 ms, triton 1237 ms, sdpa-cudnn 1180 ms (stock
# transformers, dense: 1409 ms; bench/results/prefill_floor_h200/).
FULL_PREFILL_BACKENDS = ("auto", "sdpa-flash", "sdpa-cudnn", "triton")
CUDNN_PREFILL_MIN_TOKENS = 4096
_full_prefill = ["auto"]
# Full-layer decode steps on CPU tensors: False = SDPA (the default; the kernel would run in the Triton interpreter
# or as its reference, both slower than SDPA), True = ``kernels.full_decode`` (for tests of the wiring).
FULL_DECODE_KERNEL_ON_CPU = False


def prefill_attention(q, k, v, *, sink: int, window: int, q_offset: int, kv_start: torch.Tensor | None,
                      scale: float | None, stream_heads: torch.Tensor | None = None, return_lse: bool = False):
    """Sink + window attention of contiguous queries against contiguous keys (key ``j`` at position
    ``j - kv_start[b]``, query ``i`` at ``q_offset + i - kv_start[b]``)."""
    fn = kernels.streaming_attention if q.is_cuda else kernels.streaming_attention_reference
    start = None if kv_start is None else kv_start.to(device=q.device, dtype=torch.int32)
    return fn(q, k, v, sink=sink, window=window, q_offset=q_offset, kv_start=start, scale=scale,
              stream_heads=stream_heads, return_lse=return_lse)


def slot_attention(q, k, v, slot_pos: torch.Tensor, q_pos: torch.Tensor, *, sink: int, window: int,
                   scale: float | None, stream_heads: torch.Tensor | None = None):
    """Sink + window attention against slots with explicit positions (``slot_pos [batch, N]``, -1 = empty;
    ``q_pos [batch, n]``)."""
    if not q.is_cuda:
        return kernels.streaming_decode_reference(q, k, v, slot_pos, q_pos, sink=sink, window=window, scale=scale,
                                                  stream_heads=stream_heads)
    # the decode kernel holds all query rows of one KV head in one tile: feed a long chunk in slices
    n, group = q.shape[2], q.shape[1] // k.shape[1]
    step = max(1, DECODE_TILE_ROWS // group)
    if n <= step:
        return kernels.streaming_decode(q, k, v, slot_pos, q_pos, sink=sink, window=window, scale=scale,
                                        stream_heads=stream_heads)
    return torch.cat([
        kernels.streaming_decode(q[:, :, i:i + step], k, v, slot_pos, q_pos[:, i:i + step], sink=sink,
                                 window=window, scale=scale, stream_heads=stream_heads)
        for i in range(0, n, step)
    ], dim=2)


def full_attention(module, q, k, v, *, q_offset: int, kv_start: torch.Tensor | None, has_padding: bool,
                   scale: float | None, dropout: float = 0.0, sliding_window: int | None = None,
                   n_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Full causal attention (SDPA, or the prefill kernel for an unpadded chunk after cached keys on CUDA); returns
    ``[batch, heads, n, head_dim]``.

    ``sliding_window``: the model's own window for this layer (Gemma 2/3, Mistral, Qwen with sliding layers), which
    the layer was trained with: a query at ``p`` then sees only keys in ``(p - sliding_window, p]``.

    ``n_valid``: a static decode step (one query, the last of the keys that exist): ``k``/``v`` are the layer's
    whole reserved storage and only the first ``n_valid`` keys (int tensor ``[1]`` on the device) exist.
    """
    n, big_n = q.shape[2], k.shape[2]
    if n_valid is not None:
        return _static_decode(module, q, k, v, n_valid, kv_start=kv_start if has_padding else None, scale=scale,
                              dropout=dropout, sliding_window=sliding_window)
    if n == 1 and not sliding_window and _full_decode_applies(q, k, q_offset, dropout):
        start = None
        if has_padding and kv_start is not None:
            # a sequence with no real key yet sees its own key, as under the SDPA mask below
            start = kv_start.to(q.device).clamp(max=big_n - 1)
        return kernels.full_decode(q, k, v, kv_start=start, scale=scale)
    if sliding_window:
        mask = causal_padding_mask(n, big_n, q_offset=q_offset, kv_start=kv_start if has_padding else None,
                                   device=q.device, window=int(sliding_window))
        return _sdpa(module, q, k, v, mask, scale=scale, dropout=dropout)
    if (q.is_cuda and 1 < n < big_n and not has_padding and dropout == 0.0 and not kernels.reference_forced()
            and q.shape[-1] <= kernels.MAX_HEAD_DIM):
        # measured on an H100, Llama-3-8B shape, 32k tokens in 8k chunks: SDPA with the mask (mem-efficient
        # kernel) made chunked prefill 1.7x slower than one pass (bench/results/chunked_prefill_8b_h100*.json)
        return prefill_attention(q, k, v, sink=0, window=q_offset + n, q_offset=q_offset, kv_start=None,
                                 scale=scale)
    mask = None
    if has_padding or (n > 1 and big_n != n):
        mask = causal_padding_mask(n, big_n, q_offset=q_offset, kv_start=kv_start, device=q.device)
    backend = _full_prefill[0]
    if backend == "auto":
        backend = "sdpa-cudnn" if n >= CUDNN_PREFILL_MIN_TOKENS else "sdpa-flash"
    if mask is None and n > 1 and q.is_cuda and dropout == 0.0:
        if backend == "triton" and not kernels.reference_forced() and q.shape[-1] <= kernels.MAX_HEAD_DIM:
            return prefill_attention(q, k, v, sink=0, window=big_n, q_offset=0, kv_start=None, scale=scale)
        if backend == "sdpa-cudnn":
            return _sdpa(module, q, k, v, None, scale=scale, dropout=dropout, cudnn=True)
    return _sdpa(module, q, k, v, mask, scale=scale, dropout=dropout)


def _static_decode(module, q, k, v, n_valid: torch.Tensor, *, kv_start, scale, dropout, sliding_window):
    """A full layer's decode step over reserved storage, reading the live length on the device only (no sync):
    the same keys as the dynamic path (the split-K kernel, or SDPA under a mask built from ``n_valid``)."""
    if sliding_window or q.shape[2] != 1:
        raise ValueError("a static decode step takes one query per sequence and no sliding window")
    start = None
    if kv_start is not None:
        # a sequence with no real key yet sees its own key, as on the dynamic path
        start = torch.minimum(kv_start.to(q.device).long(), n_valid.long() - 1)
    big_n = k.shape[2]
    if _full_decode_applies(q, k, big_n - 1, dropout):
        return kernels.full_decode(q, k, v, kv_start=start, scale=scale, n_valid=n_valid)
    k_idx = torch.arange(big_n, device=q.device).view(1, 1, 1, big_n)
    mask = k_idx < n_valid.view(1, 1, 1, 1)
    if start is not None:
        mask = mask & (k_idx >= start.view(-1, 1, 1, 1))
    return _sdpa(module, q, k, v, mask, scale=scale, dropout=dropout)


@contextlib.contextmanager
def full_prefill_backend(name: str):
    """Within the block, full layers prefill one unpadded pass on CUDA through ``name`` (one of
    :data:`FULL_PREFILL_BACKENDS`); decode steps, padded batches and chunks after cached keys are unaffected."""
    if name not in FULL_PREFILL_BACKENDS:
        raise ValueError(f"unknown full-layer prefill backend {name!r}; choose from {', '.join(FULL_PREFILL_BACKENDS)}")
    before = _full_prefill[0]
    _full_prefill[0] = name
    try:
        yield
    finally:
        _full_prefill[0] = before


def _full_decode_applies(q, k, q_offset: int, dropout: float) -> bool:
    """Whether a one-query step of a full layer goes to ``kernels.full_decode``: the query is the last key, no
    dropout, a dtype and head size the kernel takes; on CUDA unless ``use_reference()`` is on (then SDPA, the
    path before the kernel), on the CPU only with :data:`FULL_DECODE_KERNEL_ON_CPU`."""
    if q_offset != k.shape[2] - 1 or dropout != 0.0:
        return False
    if q.dtype not in kernels.SUPPORTED_DTYPES or q.shape[-1] > kernels.MAX_HEAD_DIM or k.dtype != q.dtype:
        return False
    if q.is_cuda:
        return not kernels.reference_forced()
    return FULL_DECODE_KERNEL_ON_CPU


def _sdpa(module, q, k, v, mask, *, scale, dropout, cudnn: bool = False) -> torch.Tensor:
    """transformers' SDPA attention (causal when ``mask`` is None), through cuDNN on CUDA only when ``cudnn``."""
    backends = [SDPBackend.CUDNN_ATTENTION, *FULL_ATTENTION_BACKENDS] if cudnn else FULL_ATTENTION_BACKENDS
    context = sdpa_kernel(backends, set_priority=cudnn) if q.is_cuda else contextlib.nullcontext()
    with context:
        out, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=scale,
                                        is_causal=mask is None)
    return out.transpose(1, 2)


def causal_padding_mask(n: int, big_n: int, *, q_offset: int, kv_start: torch.Tensor | None,
                        device, window: int | None = None) -> torch.Tensor:
    """Bool mask ``[batch or 1, 1, n, N]``: causal, without the left padding, and within ``window`` (keys in
    ``(p - window, p]``) when given. A padding query (no real key at or before it) sees its own key, so every row
    stays finite."""
    q_idx = torch.arange(n, device=device).view(1, 1, n, 1) + q_offset
    k_idx = torch.arange(big_n, device=device).view(1, 1, 1, big_n)
    visible = k_idx <= q_idx
    if window is not None:
        visible = visible & (q_idx - k_idx < window)
    if kv_start is not None:
        visible = visible & (k_idx >= kv_start.to(device).view(-1, 1, 1, 1))
    return visible | (k_idx == q_idx)


__all__ = ["prefill_attention", "slot_attention", "full_attention", "causal_padding_mask", "full_prefill_backend",
           "FULL_PREFILL_BACKENDS"]
