"""The attention function of fine-tuning, registered in transformers' registry as ``"lighttransfer_train"``.

Inside :func:`training_attention` every attention module of the model carries its layer's
:class:`~lighttransfer.training.masks.LayerRules` (streaming heads: sink + window; full heads: S²-Attn or causal;
the model's own sliding layers: their window) and the model's attention implementation is switched to this
function; leaving the block restores both. Two backends evaluate the same rule (:mod:`.masks`):

* ``flex`` (CUDA): FlexAttention, compiled, with a ``BlockMask`` per distinct layer rule and length (built once,
  cached): the blocks outside the pattern are never computed, forward or backward; a layer whose every head is
  plain causal (a full layer without S²-Attn) runs SDPA's causal kernel instead (flash attention on CUDA);
* ``dense`` (the CPU, or forced): SDPA with the explicit ``[heads, N, N]`` boolean mask (FlexAttention has no
  backward on the CPU in torch 2.13); exact, but ``O(N^2)`` memory, so only for short sequences.

On either backend a layer of plain S²-Attn (every head full, no sink: the full layers of a hybrid trained with
``--s2-attn``) takes neither: it is causal attention within contiguous runs of positions, computed by SDPA's causal
kernel over the runs batched together (:mod:`.s2_grouped`; ``grouped_s2=False`` keeps the mask paths).

Training rows are whole (no padding), so the 2-D ``attention_mask`` is not needed; transformers builds none for an
implementation without a registered mask function.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import AttentionInterface

from ..errors import LightTransferError
from ..hybrid_format import HybridLayout
from .masks import LayerRules, dense_mask, flex_block_mask, layer_rules, s2_group_size
from .s2_grouped import grouped_s2_group, s2_grouped_attention

log = logging.getLogger(__name__)

ATTENTION_NAME = "lighttransfer_train"
RULES_ATTR = "lighttransfer_train_rules"
Backend = Literal["auto", "flex", "dense"]


@dataclass
class TrainingAttention:
    """Per-model state while training: the layout, the S²-Attn setting and the masks built so far.

    Attributes:
        layout: the hybrid's layout (which layers / KV heads stream, sink, window, native windows).
        s2_attn: full heads use S²-Attn (else dense causal attention).
        group_frac: S²-Attn group size as a share of the sequence length.
        s2_sink: keys every S² head also sees (0 = LongLoRA's S²-Attn).
        backend: ``flex`` or ``dense`` (resolved from ``auto`` by the device).
        grouped_s2: plain S²-Attn layers run as causal attention over their groups (:mod:`.s2_grouped`) instead
            of through ``backend``'s mask; the same pairs either way.
    """

    layout: HybridLayout
    s2_attn: bool = True
    group_frac: float = 0.25
    s2_sink: int = 0
    backend: str = "dense"
    grouped_s2: bool = True
    _masks: dict = field(default_factory=dict, repr=False)

    def rules(self, layer: int, num_heads: int, seq_len: int) -> LayerRules:
        kv_mask = self.layout.kv_head_mask(layer)
        per_kv = num_heads // len(kv_mask)
        streaming = [kv_mask[h // per_kv] for h in range(num_heads)]
        group = s2_group_size(seq_len, self.group_frac) if self.s2_attn else None
        return layer_rules(num_heads, streaming_heads=streaming, sink=self.layout.sink, window=self.layout.window,
                           s2_group=group, s2_sink=self.s2_sink,
                           native_window=self.layout.native_windows.get(layer))

    def mask(self, rules: LayerRules, seq_len: int, device: torch.device):
        key = (rules, seq_len, str(device), self.backend)
        mask = self._masks.get(key)
        if mask is None:
            if self.backend == "flex":
                mask = flex_block_mask(rules, seq_len, device=device)
            else:
                mask = dense_mask(rules, seq_len, device=device)
            if len(self._masks) > 16:  # lengths change rarely; keep the cache small
                self._masks.clear()
            self._masks[key] = mask
        return mask


_flex_compiled = None


def _flex():
    global _flex_compiled
    if _flex_compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled


def training_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-function signature: ``query [B, H, N, D]``, ``key/value [B, Hkv, N, D]``; returns
    ``(output [B, N, H, D], None)``."""
    state: TrainingAttention | None = getattr(module, RULES_ATTR, None)
    if state is None:
        raise LightTransferError("the 'lighttransfer_train' attention runs only inside training_attention().")
    if query.shape[2] != key.shape[2]:
        raise LightTransferError("fine-tuning attention takes whole sequences (no cache): call the model with "
                                 "use_cache=False.")
    heads, seq_len = query.shape[1], query.shape[2]
    # under autocast, fp32 hidden states (trained fp32 norms or embeddings) make RoPE return fp32 queries and keys
    # beside bf16 values; SDPA is an autocast op and casts them, FlexAttention is not: one dtype for all three
    dtype = torch.get_autocast_dtype(query.device.type) if torch.is_autocast_enabled(query.device.type) \
        else value.dtype
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    rules = state.rules(module.layer_idx, heads, seq_len)
    gqa = heads != key.shape[1]
    group = grouped_s2_group(rules) if state.grouped_s2 else None
    if group is not None:  # plain S²-Attn: causal within runs, no mask
        out = s2_grouped_attention(query, key, value, group=group, scale=scaling,
                                   dropout=dropout if module.training else 0.0)
    elif rules.is_causal:  # plain causal (full layers without S²-Attn): SDPA's flash kernel beats any mask
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa,
            dropout_p=dropout if module.training else 0.0)
    elif state.backend == "flex":
        out = _flex()(query, key, value, block_mask=state.mask(rules, seq_len, query.device), scale=scaling,
                      enable_gqa=gqa)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=state.mask(rules, seq_len, query.device), scale=scaling, enable_gqa=gqa,
            dropout_p=dropout if module.training else 0.0)
    return out.transpose(1, 2).contiguous(), None


def resolve_backend(backend: Backend, device: torch.device) -> str:
    """``auto``: FlexAttention on CUDA, explicit masks elsewhere; ``flex`` off CUDA is refused."""
    if backend == "auto":
        return "flex" if device.type == "cuda" else "dense"
    if backend == "flex" and device.type != "cuda":
        raise LightTransferError("--attention flex needs a CUDA device (FlexAttention has no backward on the CPU); "
                                 "use --attention dense or auto.")
    if backend not in ("flex", "dense"):
        raise LightTransferError(f"attention backend {backend!r} is not known; use auto, flex or dense.")
    return backend


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention modules of a transformers model: those with a ``layer_idx`` whose class is an
    attention (``LlamaAttention``, ``GPTNeoXAttention``, ...)."""
    found = [m for m in model.modules() if hasattr(m, "layer_idx") and "attention" in type(m).__name__.lower()]
    if not found:
        raise LightTransferError(f"{type(model).__name__} has no attention modules with a layer index; this "
                                 "architecture cannot be fine-tuned with the hybrid's masks.")
    return found


@contextlib.contextmanager
def training_attention(model, state: TrainingAttention) -> Iterator[TrainingAttention]:
    """Run ``model`` (a transformers model, or a peft model around one) with the training masks inside the block.

    Every attention module gets ``state``; the attention implementation becomes ``"lighttransfer_train"`` and
    is set back on exit, whatever happens."""
    register()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    modules = attention_modules(base)
    previous = base.config._attn_implementation
    for m in modules:
        setattr(m, RULES_ATTR, state)
    base.set_attn_implementation(ATTENTION_NAME)
    try:
        yield state
    finally:
        for m in modules:
            if hasattr(m, RULES_ATTR):
                delattr(m, RULES_ATTR)
        base.set_attn_implementation(previous or "sdpa")


def register() -> None:
    """Register :func:`training_attention_forward` under ``"lighttransfer_train"`` (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, training_attention_forward)


__all__ = ["ATTENTION_NAME", "TrainingAttention", "training_attention", "training_attention_forward",
           "resolve_backend", "register"]
