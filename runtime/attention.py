"""The attention function registered in transformers' registry under the name ``"lighttransfer"``.

A model switched to it (``config._attn_implementation == "lighttransfer"``) calls
:func:`lighttransfer_attention` in every attention layer, after the layer has applied RoPE at the tokens'
original positions and updated the cache. What it does depends on the layer:

* a full layer (or any layer without a plan) -> transformers' SDPA attention, causal, minus left padding, and
  within the model's own sliding window when the layer has one; with sparse prefill on and enough keys, its
  prefill goes block-sparse instead (:mod:`.sparse_prefill`); a decode step on CUDA (one query against the
  layer's whole cache, no native window) -> the split-K kernel ``kernels.full_decode`` (see :mod:`.ops`);
* a streaming layer whose cache part is a :class:`~lighttransfer.runtime.cache.StreamingLayer` -> the keys that
  ``update`` returned, at the positions its ``view`` records (contiguous first forward, or explicit slots);
* a streaming layer without our cache (``use_cache=False``, or another ``Cache``) -> sink + window attention over
  the contiguous keys it was given (exact, only memory is not bounded);
* a mixed layer (some KV heads stream) -> its full KV heads' query heads through SDPA over their full history,
  its streaming KV heads' query heads over their slots, outputs put back in head order; without our cache,
  one launch of the kernels' per-head mode over the contiguous keys;
* online mode, during the prompt's first forward -> full attention, then the layer's lazy ratio is offered to the
  running selection and the layers it drops are trimmed at once;
* a full layer of a cache with TokenSelect (``decode="tokenselect"``), for a decode step (and for a continuation
  chunk when the cache's ``select_chunks`` is on) -> :func:`~lighttransfer.runtime.token_select.token_select_attention`
  (each query over its selected keys), or dense attention when the budget covers every candidate; a prefill chunk
  otherwise attends densely;
* a full layer of a cache with head routing (``head_routing="qada"|"oracle"|"random"|"static"``), for a decode step
  (and each query of a continuation chunk when ``select_chunks`` is on) ->
  :meth:`~lighttransfer.runtime.head_routing.HeadRouting.attend` (each KV head over sink + window or every key).

Per-model state lives on the modules (``module.lighttransfer_plan``) and on the cache; the per-forward context
(the cache and the left padding) arrives through the keyword ``lighttransfer_step``, which the model's forward
pre-hook adds (:mod:`lighttransfer.runtime.hybrid`). Nothing global changes beyond the registration.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicSlidingWindowLayer

from ..hybrid_format import HybridLayout
from ..kernels import merge_attention
from .cache import (
    ChunkView,
    ContiguousView,
    FullLayer,
    HybridCache,
    MixedLayer,
    SlotView,
    StaticStep,
    StreamingLayer,
)
from .head_routing import RoutingState
from .online import prompt_lazy_ratio
from .ops import full_attention, prefill_attention, slot_attention
from .sparse_prefill import PrefillRecord, SparsePrefill
from .token_select import token_select_attention

ATTENTION_NAME = "lighttransfer"
STEP_KWARG = "lighttransfer_step"
PLAN_ATTR = "lighttransfer_plan"


@dataclass(frozen=True)
class LayerPlan:
    """One attention layer's view of the model's :class:`~lighttransfer.hybrid_format.HybridLayout`, read once
    (the attention function consults it in every layer of every forward): ``kind`` is ``full``, ``streaming``,
    ``mixed`` (``kv_head_mask``: per KV head, True = streams) or ``online`` (decided per prompt)."""

    layer_idx: int
    layout: HybridLayout = field(repr=False)
    kind: str = field(init=False)
    sink: int = field(init=False)
    window: int = field(init=False)
    prefill: str = field(init=False)
    kv_head_mask: tuple[bool, ...] | None = field(init=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "kind", self.layout.layer_kind(self.layer_idx))
        set_(self, "sink", self.layout.sink)
        set_(self, "window", self.layout.window)
        set_(self, "prefill", self.layout.prefill)
        set_(self, "kv_head_mask", self.layout.mixed_masks.get(self.layer_idx))

    def query_head_mask(self, num_heads: int, device) -> torch.Tensor:
        """bool ``[num_heads]``: True where the query head's KV head streams (GQA groups are contiguous)."""
        kv = torch.tensor(self.kv_head_mask, device=device)
        return kv.repeat_interleave(num_heads // kv.numel())


@dataclass
class StepContext:
    """What one forward pass tells every attention layer.

    Attributes:
        cache: the :class:`HybridCache` of this forward, or ``None`` (no cache, or a foreign one).
        kv_start: int64 ``[batch]`` left padding of each sequence, or ``None`` (no padding).
        has_padding: whether any sequence is left-padded.
        static: the cache's :class:`~lighttransfer.runtime.cache_state.StaticStep` during static decode steps
            (full layers then get their whole storage and read the live length ``static.n_valid`` on the device).
        sparse: the model's block-sparse prefill of the full layers, or ``None`` (dense).
    """

    cache: HybridCache | None
    kv_start: torch.Tensor | None
    has_padding: bool
    static: StaticStep | None = None
    sparse: SparsePrefill | None = None


def lighttransfer_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-function signature: ``query [B, H, n, D]``, ``key/value [B, Hkv, N, D]`` (as the
    cache returned them); returns ``(output [B, n, H, D], None)``."""
    step: StepContext | None = kwargs.get(STEP_KWARG)
    plan: LayerPlan | None = getattr(module, PLAN_ATTR, None)
    kv_start = step.kv_start if step is not None else None
    has_padding = step.has_padding if step is not None else False
    cache = step.cache if step is not None else None
    part = cache.layers[module.layer_idx] if cache is not None and module.layer_idx < len(cache.layers) else None
    n, big_n = query.shape[2], key.shape[2]
    # static decode step: the full keys are the layer's whole storage, of which the first n_valid exist
    n_valid = step.static.n_valid if step is not None and step.static is not None and part is not None else None

    if isinstance(part, StreamingLayer):
        out = _streaming_from_view(module, query, key, value, part, kv_start, has_padding, scaling, dropout)
    elif isinstance(part, MixedLayer):
        out = _mixed(module, query, key, value, part, kv_start, has_padding, scaling, dropout, n_valid)
    elif plan is not None and plan.kind == "mixed" and part is None:
        if plan.prefill == "full" and n > 1:
            out = full_attention(module, query, key, value, q_offset=big_n - n, kv_start=kv_start,
                                 has_padding=has_padding, scale=scaling, dropout=dropout)
        else:
            out = prefill_attention(query, key, value, sink=plan.sink, window=plan.window, q_offset=big_n - n,
                                    kv_start=kv_start if has_padding else None, scale=scaling,
                                    stream_heads=plan.query_head_mask(query.shape[1], query.device))
    elif plan is not None and plan.kind == "streaming" and part is None:
        if plan.prefill == "full" and n > 1:
            out = full_attention(module, query, key, value, q_offset=big_n - n, kv_start=kv_start,
                                 has_padding=has_padding, scale=scaling, dropout=dropout)
        else:
            out = prefill_attention(query, key, value, sink=plan.sink, window=plan.window, q_offset=big_n - n,
                                    kv_start=kv_start if has_padding else None, scale=scaling)
    else:
        # a full layer keeps the model's own sliding window, if it has one (Gemma 2/3, Mistral, SWA Qwen layers)
        if has_padding and isinstance(part, DynamicSlidingWindowLayer):
            # its cache dropped the oldest keys: key index 0 is token (seen - big_n), so the padding shifts too
            kv_start = (kv_start - (part.get_seq_length() - big_n)).clamp(min=0)
        sparse = step.sparse if step is not None else None
        out = None
        if (cache is not None and cache.selection is not None and isinstance(part, FullLayer) and big_n > n
                and (n == 1 or cache.select_chunks) and dropout == 0.0 and not kwargs.get("sliding_window")):
            out = token_select_attention(query, key, value, config=cache.selection,
                                         state=cache.selection_state(module.layer_idx), stats=cache.selection_stats,
                                         kv_start=kv_start if has_padding else None, scale=scaling,
                                         n_valid=n_valid)
        routing = cache.routing if cache is not None else None
        if (out is None and routing is not None and isinstance(part, FullLayer) and big_n > n
                and (n == 1 or cache.select_chunks) and dropout == 0.0 and not kwargs.get("sliding_window")):
            state = cache.routing_states.setdefault(module.layer_idx, RoutingState())
            out = routing.attend(query, key, value, layer_idx=module.layer_idx, state=state,
                                 kv_start=kv_start if has_padding else None, scale=scaling, n_valid=n_valid)
        if out is None and sparse is not None and sparse.applies(query, key, sliding_window=kwargs.get("sliding_window"),
                                                                 dropout=dropout):
            out = sparse.attend(query, key, value, layer_idx=module.layer_idx, scale=scaling,
                                kv_start=kv_start if has_padding else None)
        if out is None:
            out = full_attention(module, query, key, value, q_offset=big_n - n, kv_start=kv_start,
                                 has_padding=has_padding, scale=scaling, dropout=dropout,
                                 sliding_window=kwargs.get("sliding_window"), n_valid=n_valid)
            if sparse is not None and n > 1:
                sparse.stats.records.append(PrefillRecord(layer=module.layer_idx, queries=n, keys=big_n,
                                                          sparse=False, density=1.0))
        online = cache.online if cache is not None else None
        if online is not None and part is not None and not online.decided and plan is not None:
            _offer_online(cache, module.layer_idx, query, key, plan, kv_start if has_padding else None, scaling)
    return out.transpose(1, 2).contiguous(), None


def _streaming_from_view(module, query, key, value, part: StreamingLayer, kv_start, has_padding, scaling,
                         dropout):
    view = part.view
    if isinstance(view, ChunkView):
        recent, lse = prefill_attention(query, key, value, sink=0, window=part.window, q_offset=part.window,
                                        kv_start=view.recent_start, scale=scaling, return_lse=True)
        if part.sink == 0:
            return recent
        # every query of the chunk sits at a position >= sink, so it sees every sink key
        sunk, sunk_lse = prefill_attention(query, view.sink_keys, view.sink_values, sink=part.sink, window=1,
                                           q_offset=part.sink, kv_start=None, scale=scaling, return_lse=True)
        return merge_attention(recent, lse, sunk, sunk_lse)[0]
    if isinstance(view, SlotView):
        return slot_attention(query, key, value, view.slot_pos, view.q_pos, sink=part.sink, window=part.window,
                              scale=scaling)
    assert isinstance(view, ContiguousView)
    if view.full:
        return full_attention(module, query, key, value, q_offset=view.q_offset, kv_start=kv_start,
                              has_padding=has_padding, scale=scaling, dropout=dropout)
    return prefill_attention(query, key, value, sink=part.sink, window=part.window, q_offset=view.q_offset,
                             kv_start=kv_start if has_padding else None, scale=scaling)


def _mixed(module, query, key, value, part: MixedLayer, kv_start, has_padding, scaling, dropout, n_valid=None):
    """Full query heads over the full KV heads' history, streaming ones over the slots, back in head order."""
    heads, n = query.shape[1], query.shape[2]
    group = heads // len(part.kv_mask)
    s_key, s_value = part.stream_kv
    part.stream_kv = None  # the first forward's are the whole prompt's keys: do not keep them alive
    if part.grouped:  # full heads first: the two groups are views and the outputs join with one cat
        f = len(part.full_heads) * group
        full = full_attention(module, query[:, :f], key, value, q_offset=key.shape[2] - n, kv_start=kv_start,
                              has_padding=has_padding, scale=scaling, dropout=dropout, n_valid=n_valid)
        stream = _streaming_from_view(module, query[:, f:], s_key, s_value, part.streaming, kv_start,
                                      has_padding, scaling, dropout)
        return torch.cat([full, stream], dim=1)
    full_kv, stream_kv = part.head_index(query.device)
    full_q = (full_kv.view(-1, 1) * group + torch.arange(group, device=query.device)).flatten()
    stream_q = (stream_kv.view(-1, 1) * group + torch.arange(group, device=query.device)).flatten()
    out = query.new_empty(query.shape[0], heads, n, value.shape[-1])
    out[:, full_q] = full_attention(module, query.index_select(1, full_q), key, value, q_offset=key.shape[2] - n,
                                    kv_start=kv_start, has_padding=has_padding, scale=scaling, dropout=dropout,
                                    n_valid=n_valid)
    out[:, stream_q] = _streaming_from_view(module, query.index_select(1, stream_q), s_key, s_value,
                                            part.streaming, kv_start, has_padding, scaling, dropout)
    return out


def _offer_online(cache: HybridCache, layer_idx: int, query, key, plan: LayerPlan, kv_start, scaling) -> None:
    online = cache.online
    n = query.shape[2]
    ratio = prompt_lazy_ratio(query, key, q_offset=key.shape[2] - n, kv_start=kv_start, sink=plan.sink,
                              window=plan.window, scale=scaling if scaling is not None else query.shape[-1] ** -0.5,
                              last=online.last)
    for victim in online.offer(layer_idx, ratio):
        cache.make_streaming(victim)


def register() -> None:
    """Register :func:`lighttransfer_attention` under ``"lighttransfer"`` (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, lighttransfer_attention)


register()

__all__ = ["lighttransfer_attention", "LayerPlan", "StepContext", "ATTENTION_NAME", "STEP_KWARG", "PLAN_ATTR",
           "register"]
