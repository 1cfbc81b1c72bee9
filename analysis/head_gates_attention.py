"""Gated attention: each KV head's output mixes full causal attention and sink + window attention.

DuoAttention (arXiv 2410.10819, Sec. 3.1, Eq. 1) gives every KV head of every layer a gate ``alpha`` in [0, 1]
and replaces the head's attention output by::

    attn = alpha * full_attn(Q, K, V) + (1 - alpha) * streaming_attn(Q, K, V)

where ``streaming_attn`` sees only the first ``sink`` keys and the ``window`` most recent ones
(:func:`lighttransfer.kernels.mask.streaming_visible`). With GQA, the query heads that read one KV head share
its gate: the KV head is the unit whose cache can be dropped.

:func:`gated_attention` registers :func:`gated_attention_forward` in transformers' ``AttentionInterface`` under
:data:`ATTENTION_NAME` and switches the model to it inside a ``with`` block, restoring the previous
implementation on exit. Both branches are plain SDPA calls (the full one causal, the streaming one with the
dense mask of ``kernels.mask``), so the output is differentiable with respect to the gates; the Triton
streaming kernels are forward-only and are not used here.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..architecture import model_shape
from ..errors import LightTransferError
from ..kernels.mask import streaming_mask
from .capture import attention_configs

ATTENTION_NAME = "lighttransfer_gated"


@dataclass
class GatePlan:
    """What :func:`gated_attention_forward` mixes while a model runs inside :func:`gated_attention`.

    Attributes:
        gates: ``[num_layers, num_kv_heads]`` float tensor in [0, 1] (1 = full attention, 0 = streaming); may
            require grad.
        sink: initial tokens the streaming branch keeps.
        window: most recent positions the streaming branch keeps (each query's own included).
    """

    gates: torch.Tensor
    sink: int
    window: int


_active: ContextVar[GatePlan | None] = ContextVar("lighttransfer_gated_attention", default=None)


def _streaming_visible(attention_mask: torch.Tensor | None, q_len: int, k_len: int, *, sink: int, window: int,
                       device: torch.device) -> torch.Tensor:
    """Bool mask ``[q_len, k_len]`` or ``[batch, 1, q_len, k_len]`` (True = attend) of the streaming branch.

    The queries are the last ``q_len`` positions of the keys (unpadded rows). A padding mask from transformers
    (bool, or additive float with 0 where visible) is intersected with the sink + window rule.
    """
    visible = streaming_mask(q_len, k_len, sink=sink, window=window, device=device)
    if attention_mask is None:
        return visible
    allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    return allowed[..., -k_len:] & visible


def gated_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention function with the signature of transformers' ``AttentionInterface``.

    Args:
        module: the attention module (its ``layer_idx`` picks the row of gates).
        query: ``[batch, q_heads, q_len, head_dim]``; key/value: ``[batch, kv_heads, k_len, head_dim]``.
        attention_mask: what the ``sdpa`` mask function built (``None`` for unpadded causal rows).
        scaling: softmax scale (default ``head_dim ** -0.5``).

    Returns:
        ``(out [batch, q_len, q_heads, head_dim] in query.dtype, None)``.
    """
    plan = _active.get()
    if plan is None:
        raise LightTransferError(f"attention '{ATTENTION_NAME}' only runs inside lighttransfer's gated_attention().")
    if kwargs.get("softcap") is not None:
        raise LightTransferError("gated attention does not support attention logit soft-capping (softcap).")
    layer = int(module.layer_idx)
    q_heads, kv_heads = query.shape[1], key.shape[1]
    group = q_heads // kv_heads
    q_len, k_len = query.shape[2], key.shape[2]
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    key = key.repeat_interleave(group, dim=1)  # [B, H, N, D]: query head h reads KV head h // group
    value = value.repeat_interleave(group, dim=1)

    if attention_mask is None:
        # same call as transformers' sdpa path for unpadded rows, so alpha = 1 reproduces it exactly
        full = F.scaled_dot_product_attention(query, key, value, is_causal=q_len > 1, scale=scale)
    else:
        causal = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        full = F.scaled_dot_product_attention(query, key, value, attn_mask=causal[..., -k_len:], scale=scale)
    visible = _streaming_visible(attention_mask, q_len, k_len, sink=plan.sink, window=plan.window,
                                 device=query.device)
    stream = F.scaled_dot_product_attention(query, key, value, attn_mask=visible, scale=scale)

    alpha = plan.gates[layer].to(device=query.device, dtype=full.dtype).repeat_interleave(group)  # [H]
    alpha = alpha.view(1, q_heads, 1, 1)
    out = alpha * full + (1.0 - alpha) * stream  # Eq. 1, per KV head
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, gated_attention_forward)
    if ATTENTION_NAME not in AttentionMaskInterface._global_mapping:
        # the sdpa mask: None for unpadded causal rows, a bool mask otherwise
        AttentionMaskInterface.register(ATTENTION_NAME, AttentionMaskInterface._global_mapping["sdpa"])


@contextlib.contextmanager
def gated_attention(model: torch.nn.Module, gates: torch.Tensor, *, sink: int, window: int) -> Iterator[GatePlan]:
    """Inside the block, ``model`` runs every layer with gated attention (Eq. 1) under ``gates``.

    Args:
        model: a transformers decoder whose attention goes through ``AttentionInterface``.
        gates: ``[num_layers, num_kv_heads]`` in [0, 1]; the same tensor is read at every forward, so an
            optimizer may update it in place between forwards.
        sink, window: the streaming branch's rule (:func:`~lighttransfer.kernels.mask.streaming_visible`).

    The model's attention implementation is restored on exit, also when the block raises.
    """
    shape = model_shape(model.config)
    layers, kv_heads = shape.num_layers, shape.num_kv_heads
    if tuple(gates.shape) != (layers, kv_heads):
        raise LightTransferError(
            f"gates have shape {tuple(gates.shape)}, the model needs [{layers}, {kv_heads}] (layers x KV heads)."
        )
    if sink < 0 or window < 1:
        raise LightTransferError(f"sink must be >= 0 and window >= 1, got sink {sink}, window {window}.")
    if _active.get() is not None:
        raise LightTransferError("gated attention is already active; it cannot be nested.")
    _register()
    configs = attention_configs(model)
    originals = [c._attn_implementation for c in configs]
    token = _active.set(GatePlan(gates=gates, sink=int(sink), window=int(window)))
    try:
        for c in configs:
            c._attn_implementation = ATTENTION_NAME
        yield _active.get()
    finally:
        for c, original in zip(configs, originals, strict=True):
            c._attn_implementation = original
        _active.reset(token)


__all__ = ["ATTENTION_NAME", "GatePlan", "gated_attention", "gated_attention_forward"]
