"""An independent, slow reference for evaluating hybrids: the dense model with a per-layer streaming mask.

The model keeps its full KV cache; streaming layers simply *mask* every key outside sink + window
(:func:`lighttransfer.kernels.mask.streaming_visible`). For the quantities the evaluation measures (the logits
of every position) this is exactly what a bounded sink + ring-buffer cache computes, so it serves as a check on
the runtime and lets the evaluation run on any model transformers can load, with nothing converted.

It honours the three policies of a hybrid:

* ``prefill="streaming"``: streaming layers mask in every forward call;
* ``prefill="full"``: the first forward call (the prompt, no cache yet) is full causal attention; later calls
  (decode, or a continuation chunk) mask, as a cache trimmed to sink + window after prefill would;
* online mode (``online_ratio``): the prompt is prefilled with full attention while each layer's lazy ratio
  (LightTransfer, Sec. 3.2: the attention mass the last ``last`` queries put on the sink and recent keys) is
  measured; the ``round(online_ratio * num_layers)`` laziest layers then stream for the rest of the sequence;
* TokenSelect (``layout.selection``): after the first forward call, the full layers' queries attend the keys
  :func:`lighttransfer.runtime.token_select.token_select_attention` selects over the dense cache (the same rule
  and Selection Cache as the runtime, here over transformers' own contiguous cache).

Hooks live in a context manager: the attention function is registered once under its own name in
transformers' ``AttentionInterface`` and the model's implementation is switched only inside ``with``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..architecture import model_shape
from ..hybrid_format import HybridLayout
from ..kernels.mask import streaming_visible

log = logging.getLogger(__name__)

ATTENTION_NAME = "lighttransfer_masked_reference"
_ACTIVE: list[_MaskPlan] = []


@dataclass
class _MaskPlan:
    """What the reference attention does, per layer, while a model runs inside :func:`masked_streaming`: the
    layout, and the state of one sequence (which layers have seen their prefill; in online mode, the lazy ratios
    measured on the prompt and the layers chosen from them)."""

    layout: HybridLayout
    streaming_layers: set[int] = field(default_factory=set)
    prefilled: set[int] = field(default_factory=set)
    online_scores: dict[int, float] = field(default_factory=dict)
    selection_states: dict = field(default_factory=dict)
    selection_stats: object = None

    def __post_init__(self) -> None:
        self.streaming_layers = set(self.layout.streaming_layers)

    # the layout's fields the attention function reads
    num_layers = property(lambda self: self.layout.num_layers)
    sink = property(lambda self: self.layout.sink)
    window = property(lambda self: self.layout.window)
    prefill = property(lambda self: self.layout.prefill)
    online_ratio = property(lambda self: self.layout.online_ratio)
    online_last = property(lambda self: self.layout.online_last)

    def kv_head_streams(self, layer: int) -> list[bool] | None:
        """``[num_kv_heads]`` flags of the KV heads that stream in ``layer`` now, or ``None`` for a full layer."""
        if layer in self.streaming_layers:
            return [True] * self.layout.num_kv_heads
        mask = self.layout.head_masks.get(layer)
        return list(mask) if mask and any(mask) else None

    def finish_online_selection(self) -> None:
        """After the prompt: stream the laziest ``online_ratio`` share of layers from now on."""
        if self.online_ratio is None or not self.online_scores:
            return
        k = round(self.online_ratio * self.num_layers)
        ranked = sorted(self.online_scores, key=lambda i: (-self.online_scores[i], i))
        self.streaming_layers = set(ranked[:k])
        log.debug("online selection: %s", sorted(self.streaming_layers))


def _lazy_ratio(query: torch.Tensor, key: torch.Tensor, scaling: float, sink: int, window: int, last: int) -> float:
    """LightTransfer's lazy ratio of one layer on one prompt (Sec. 3.2, Eq. 2).

    Args:
        query: ``[batch, q_heads, seq, head_dim]`` of the whole prompt.
        key: ``[batch, kv_heads, seq, head_dim]``.
    Returns:
        the mean over batch, heads and the last ``last`` queries of the softmax mass on sink + window keys.
    """
    seq = key.shape[2]
    last = min(last, query.shape[2])
    q = query[:, :, -last:].float()
    k = key.float().repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    q_pos = torch.arange(seq - last, seq, device=q.device).unsqueeze(-1)
    k_pos = torch.arange(seq, device=q.device).unsqueeze(0)
    scores = (q @ k.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~(k_pos <= q_pos), float("-inf"))
    probs = scores.softmax(dim=-1)
    keep = streaming_visible(q_pos, k_pos, sink, window)
    return float((probs * keep).sum(-1).mean())


def _sdpa(query, key, value, *, mask=None, is_causal=False, scale):
    """``scaled_dot_product_attention`` with GQA: ``query [b, hq, n, d]``, ``key/value [b, hkv, m, d]``."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=is_causal,
                                                            scale=scale)


def _causal_attention(query, key, value, *, scale):
    """Full causal attention of the last ``n`` positions over ``m`` keys: ``[b, hq, n, d]``."""
    n, m = query.shape[2], key.shape[2]
    if n == m:
        return _sdpa(query, key, value, is_causal=True, scale=scale)
    q_pos = torch.arange(m - n, m, device=query.device).unsqueeze(-1)
    k_pos = torch.arange(m, device=query.device).unsqueeze(0)
    return _sdpa(query, key, value, mask=k_pos <= q_pos, scale=scale)


def _streaming_attention(query, key, value, *, sink: int, window: int, scale: float, block: int = 256):
    """Sink + window attention of the last ``n`` positions over ``m`` keys, ``[b, hq, n, d]``.

    Blockwise so that the cost is ``O(n * (sink + window + block))`` rather than ``O(n * m)``: a block of
    queries at positions ``[a, b)`` can only see the sink keys and the keys in ``(a - window, b)``; inside that
    slice the mask is the exact rule of :func:`~lighttransfer.kernels.mask.streaming_visible`.
    """
    n, m = query.shape[2], key.shape[2]
    offset = m - n
    outs = []
    for start in range(0, n, block):
        stop = min(n, start + block)
        a, b = offset + start, offset + stop
        lo = max(0, a - window + 1)
        sink_end = min(sink, lo)
        k_pos = torch.cat([torch.arange(sink_end), torch.arange(lo, b)]).to(query.device)
        keys = torch.cat([key[:, :, :sink_end], key[:, :, lo:b]], dim=2)
        values = torch.cat([value[:, :, :sink_end], value[:, :, lo:b]], dim=2)
        q_pos = torch.arange(a, b, device=query.device).unsqueeze(-1)
        mask = streaming_visible(q_pos, k_pos.unsqueeze(0), sink, window)
        outs.append(_sdpa(query[:, :, start:stop], keys, values, mask=mask, scale=scale))
    return torch.cat(outs, dim=2)


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention with the sink + window rule on streaming layers (signature of transformers' attention API).

    Shapes: ``query [batch, q_heads, q_len, head_dim]``, ``key/value [batch, kv_heads, k_len, head_dim]``;
    returns ``[batch, q_len, q_heads, head_dim]``. Sequences are unpadded, so the queries are the last ``q_len``
    positions of the keys.
    """
    plan = _ACTIVE[-1]
    layer = int(module.layer_idx)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    is_prefill = layer not in plan.prefilled
    plan.prefilled.add(layer)

    if is_prefill and plan.online_ratio is not None:
        plan.online_scores[layer] = _lazy_ratio(query, key, scale, plan.sink, plan.window, plan.online_last)

    streams = plan.kv_head_streams(layer)
    if is_prefill and plan.prefill == "full":
        streams = None
    native = kwargs.get("sliding_window")
    if streams is None and native:
        # the layer's own window (Gemma 2/3, Mistral, SWA Qwen layers): window-only, the sink + window rule with
        # no sink
        out = _streaming_attention(query, key, value, sink=0, window=int(native), scale=scale)
    elif streams is None:
        out = None
        if plan.layout.selection is not None and not is_prefill:
            from ..runtime.token_select import SelectionState, token_select_attention

            state = plan.selection_states.setdefault(layer, SelectionState())
            out = token_select_attention(query, key, value, config=plan.layout.selection, state=state,
                                         stats=plan.selection_stats, kv_start=None, scale=scale)
        if out is None:
            out = _causal_attention(query, key, value, scale=scale)
    else:
        out = _streaming_attention(query, key, value, sink=plan.sink, window=plan.window, scale=scale)
        if not all(streams):
            groups = query.shape[1] // key.shape[1]
            per_head = torch.tensor(streams, device=query.device).repeat_interleave(groups)
            full = _causal_attention(query, key, value, scale=scale)
            out = torch.where(per_head[None, :, None, None], out, full)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _reference_attention)


@contextlib.contextmanager
def masked_streaming(
    model,
    layout: HybridLayout | None = None,
    *,
    streaming_layers=(),
    head_masks: dict[int, list[bool]] | None = None,
    sink: int = 4,
    window: int = 1020,
    prefill: str = "streaming",
    online_ratio: float | None = None,
    online_last: int = 64,
    selection_stats=None,
) -> Iterator[_MaskPlan]:
    """Run ``model`` (a dense transformers causal LM) as a hybrid, by masking, inside the ``with`` block.

    The hybrid is ``layout``, or the one the keyword arguments describe (on the model's shape). One block is one
    sequence's life: its first forward call is the prefill. Open a new block per sequence. Yields the plan; call
    ``plan.finish_online_selection()`` after the prefill in online mode. ``selection_stats``: a
    :class:`~lighttransfer.runtime.token_select.SelectionStats` that TokenSelect's counts go to.
    """
    _register()
    if layout is None:
        shape = model_shape(model.config)
        layout = HybridLayout(num_layers=shape.num_layers, num_kv_heads=shape.num_kv_heads,
                              streaming_layers=streaming_layers, head_masks=head_masks or {}, sink=sink,
                              window=window, prefill=prefill, online_ratio=online_ratio, online_last=online_last)
    config = model.config
    plan = _MaskPlan(layout, selection_stats=selection_stats)
    previous = config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    _ACTIVE.append(plan)
    try:
        yield plan
    finally:
        _ACTIVE.pop()
        model.set_attn_implementation(previous)


__all__ = ["masked_streaming", "ATTENTION_NAME"]
