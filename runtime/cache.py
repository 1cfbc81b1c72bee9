"""The hybrid KV cache: full layers keep every token, streaming layers keep ``sink + window`` slots.

:class:`HybridCache` is an ordinary transformers :class:`~transformers.Cache` whose per-layer parts are
:class:`FullLayer` for full layers (preallocated storage written in place, so a decode step copies nothing but the new
token) and :class:`StreamingLayer` (a ring buffer with each slot's absolute position, see
:mod:`lighttransfer.runtime.slots`) for streaming layers.
``generate``, pipelines and beam-search bookkeeping see a normal cache; ``get_seq_length`` counts every token
processed, so position bookkeeping outside the cache is unchanged.

A streaming layer's ``update`` stores what it must keep and returns the keys the attention of this step has to
see, and records in :attr:`StreamingLayer.view` where those keys sit (contiguous positions, or explicit slot
positions), which the registered attention function reads.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

from ..errors import LightTransferError
from .cache_state import (
    ChunkView,
    ContiguousView,
    SequenceState,
    SlotView,
    StaticStep,
    leading_padding,
    tensor_nbytes,
)
from .full_layer import FullLayer
from .mixed_layer import MixedLayer
from .streaming_layer import StreamingLayer
from .token_select import SelectionState, SelectionStats


def options_static_unsupported(selection, routing) -> str | None:
    """Why the runtime's decode options rule out static (CUDA-graph) steps whatever the cache holds, or ``None``:
    ``selection`` (a TokenSelect config) and ``routing`` (a head routing) as the runtime holds them."""
    if selection is not None and routing is not None:
        return "TokenSelect and head routing together (a static step runs one of them on the full layers)"
    if routing is not None:
        return routing.static_unsupported()
    return None


class HybridCache(Cache):
    """A transformers ``Cache`` whose full layers keep every token in preallocated storage (:class:`FullLayer`)
    and whose streaming layers keep ``sink + window`` slots (:class:`StreamingLayer`).

    Args:
        kinds: per decoder layer, ``"full"``, ``"streaming"`` or ``"mixed"``.
        kv_head_masks: ``{layer: [bool] * kv_heads}`` for the mixed layers (True = that KV head streams).
        sink, window: tokens a streaming layer keeps (first ``sink`` + the last ``window``).
        prefill: ``streaming`` or ``full`` (streaming layers attend fully in prefill, trimmed after).
        online: an online selector (see :mod:`lighttransfer.runtime.online`) when the layout is decided per
            prompt; every layer then starts full.
        native_windows: ``{layer: window}`` for the model's own sliding layers that run full here; their cache
            keeps only what that window can see (transformers' ``DynamicSlidingWindowLayer``).
        max_tokens: tokens per sequence the full layers (and the full heads of mixed layers) allocate room for at
            their first update, e.g. prompt + ``max_new_tokens``: a generation that stays within it allocates
            once. Default: grow as needed (see :class:`FullLayer`).
        selection: TokenSelect's settings for the full layers' decode steps (``None``: dense); each full layer then
            has a :class:`~lighttransfer.runtime.token_select.SelectionState` in :attr:`selection_states`.
        selection_stats: where the Selection Cache counts go (default: a fresh
            :class:`~lighttransfer.runtime.token_select.SelectionStats` of this cache's own).
        select_chunks: with TokenSelect, a forward of several tokens after the prefill selects per query (as
            decoding would) instead of attending densely (a prefill chunk); the same for head routing.
        routing: the model's :class:`~lighttransfer.runtime.head_routing.HeadRouting` of the full layers' decode
            steps (``None``: dense); its key moments per full layer go in :attr:`routing_states`.
    """

    def __init__(self, kinds, *, sink: int, window: int, prefill: str = "streaming", kv_head_masks=None,
                 online=None, native_windows: dict[int, int] | None = None, max_tokens: int | None = None,
                 selection=None, selection_stats: SelectionStats | None = None, select_chunks: bool = False,
                 routing=None) -> None:
        self.sequence = SequenceState()
        self.selection = selection
        self.routing = routing
        self.select_chunks = bool(select_chunks)
        self.selection_stats = selection_stats if selection_stats is not None else SelectionStats()
        self.selection_states: dict[int, SelectionState] = {}
        # head routing's key moments per full layer (runtime/head_routing.py), made at the first routed step
        self.routing_states: dict = {}
        self.sink, self.window, self.prefill = int(sink), int(window), prefill
        self.online = online
        kv_head_masks = kv_head_masks or {}
        native_windows = native_windows or {}
        reserve = int(max_tokens or 0)
        layers = []
        for idx, kind in enumerate(kinds):
            if kind == "streaming":
                layers.append(StreamingLayer(sink=sink, window=window, prefill=prefill, sequence=self.sequence))
            elif kind == "mixed":
                layers.append(MixedLayer(kv_head_masks[idx], sink=sink, window=window, prefill=prefill,
                                         sequence=self.sequence, reserve_tokens=reserve))
            elif idx in native_windows:
                # the model's own sliding layer: bounded as stock transformers bounds it (last window - 1 tokens)
                layers.append(DynamicSlidingWindowLayer(sliding_window=int(native_windows[idx])))
            else:
                layers.append(FullLayer(reserve_tokens=reserve))
        super().__init__(layers=layers)
        self._counters: list = []  # the layers whose host counters advance() moves (static steps)
        self._static_step: StaticStep | None = None  # kept across generations: a captured graph reads it
        self.static_tokens: int | None = None  # tokens per sequence reserved by begin_static

    def reserve(self, tokens: int) -> None:
        """Room for ``tokens`` tokens per sequence in every full layer and every mixed layer's full heads (now for
        layers that hold storage, at their first update otherwise). Call it before ``generate`` with
        prompt + ``max_new_tokens`` when the cache is made by hand (:func:`~lighttransfer.runtime.make_cache`)."""
        for layer in self.layers:
            if isinstance(layer, (FullLayer, MixedLayer)):
                layer.reserve(tokens)

    # ---- static decode steps (CUDA graphs) -------------------------------------------------------------------
    def static_unsupported(self) -> str | None:
        """Why this cache cannot take static decode steps right now, or ``None`` when it can."""
        if self.online is not None and not self.online.decided:
            return "online layer selection still undecided"
        reason = options_static_unsupported(self.selection, self.routing)
        if reason is not None:
            return reason
        if self.sequence.defer_compaction:
            return "chunked prefill in progress"
        if self.get_seq_length() == 0:
            return "the cache is empty (static steps follow a prefill)"
        for idx, layer in enumerate(self.layers):
            if isinstance(layer, DynamicSlidingWindowLayer):
                return f"layer {idx} keeps the model's own sliding window (transformers' cache layer)"
            inner = layer.streaming if isinstance(layer, MixedLayer) else layer
            if isinstance(inner, StreamingLayer) and inner.slot_pos is None:
                return f"layer {idx} still holds its prefill history (prefill='full' not trimmed yet)"
            if not isinstance(layer, (FullLayer, StreamingLayer, MixedLayer)):
                return f"layer {idx} is a {type(layer).__name__}"
        return None

    def begin_static(self, tokens: int) -> StaticStep:
        """Switch to static decode steps with room for ``tokens`` tokens per sequence: full layers reserve and zero
        their storage, streaming layers allocate all their slots, and every one-token ``update`` from now on writes
        at the device-side :class:`StaticStep` and returns storage of fixed shape. The host counters (``seen``)
        move only through :meth:`advance`. Raises ``LightTransferError`` where :meth:`static_unsupported` says
        why not."""
        reason = self.static_unsupported()
        if reason is not None:
            raise LightTransferError(f"static decode steps are not possible: {reason}.")
        tokens = int(tokens)
        if tokens <= self.get_seq_length():
            raise LightTransferError(f"static decode steps need room for more than the {self.get_seq_length()} "
                                     f"tokens held, got {tokens}.")
        counters = []
        for layer in self.layers:
            if isinstance(layer, StreamingLayer):
                layer.make_static()
                counters.append(layer)
            else:
                layer.make_static(tokens)
                counters.append(layer)
                if isinstance(layer, MixedLayer):
                    counters += [layer.full, layer.streaming]
        self._counters = counters
        self.static_tokens = tokens
        kv_start = self.sequence.kv_start
        if kv_start is None:
            kv_start = torch.zeros(self.layers[0].keys.shape[0], dtype=torch.long, device=self.layers[0].keys.device)
        step = self._static_step
        if step is not None and step.q_pos.shape[0] == kv_start.shape[0]:
            step.reset(self.get_seq_length(), kv_start)  # the same tensors as before: a graph captured on them
        else:
            step = self._static_step = StaticStep(self.get_seq_length(), kv_start)
        self.sequence.static = step
        if self.routing is not None:
            self.routing.begin_static(self)  # the moments up to the first static step, in their own tensors
        if self.selection is not None:
            # a captured step reads and writes the same Selection Cache tensors: a new generation starts with
            # every lookup a miss (the state a prefill leaves), in place
            for state in self.selection_states.values():
                state.invalidate()
            self.selection_stats.counter(self.sequence.static.n_valid.device)  # made outside any capture
        return step

    def load_from(self, other: HybridCache) -> None:
        """Hold ``other``'s tokens in this cache's own storage (copied in place, addresses kept), so that a decode
        step captured on this cache serves ``other``'s generation. Both caches must have the same layer kinds, the
        same batch, head counts and dtype; this one's storage must have room for ``other``'s tokens."""
        if self.sequence.static is not None:
            self.end_static()
        if [type(a) for a in self.layers] != [type(b) for b in other.layers]:
            raise LightTransferError("load_from: the caches have different layer kinds.")
        for mine, theirs in zip(self.layers, other.layers, strict=True):
            mine.load_from(theirs)
        seq, src = self.sequence, other.sequence
        if seq.kv_start is None or src.kv_start is None or seq.kv_start.shape != src.kv_start.shape:
            raise LightTransferError("load_from: the caches hold different batches.")
        seq.kv_start.copy_(src.kv_start)
        seq.min_start, seq.max_start, seq.has_padding = src.min_start, src.max_start, src.has_padding

    def advance(self, tokens: int = 1) -> None:
        """Count ``tokens`` static steps on the host (the device counters move inside the step itself)."""
        for layer in self._counters:
            layer.seen += tokens

    def end_static(self) -> None:
        """Back to dynamic steps: the full layers' views cover the tokens held again."""
        if self.sequence.static is None:
            return
        self.sequence.static = None
        for layer in self._counters:
            if isinstance(layer, FullLayer):
                layer._refresh_views()
        for layer in self._counters:  # after their inner full layers
            if isinstance(layer, MixedLayer):
                layer._sync_full()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        step = self.sequence.static
        if step is None:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if key_states.shape[2] != 1:
            raise LightTransferError("a static decode step takes one token per sequence; call end_static() first.")
        return self.layers[layer_idx].static_update(key_states, value_states, step)

    # ---- memory accounting ---------------------------------------------------------------------------------
    def kv_bytes(self) -> int:
        """Bytes of keys and values held right now, over all layers."""
        return self._bytes(allocated=False)

    def allocated_kv_bytes(self) -> int:
        """Bytes allocated for keys and values, over all layers: :meth:`kv_bytes` plus the full layers' storage
        that is not filled yet."""
        return self._bytes(allocated=True)

    def _bytes(self, *, allocated: bool) -> int:
        total = 0
        for layer in self.layers:
            if isinstance(layer, (FullLayer, MixedLayer)):
                total += layer.allocated_bytes() if allocated else layer.nbytes()
            elif layer.is_initialized:
                total += tensor_nbytes(layer.keys) + tensor_nbytes(layer.values)
        return total

    def dense_kv_bytes(self) -> int:
        """Bytes a dense cache would hold for the same tokens (every layer keeping every token)."""
        total = 0
        for layer in self.layers:
            if not layer.is_initialized or layer.keys is None:
                continue
            b, h, _, d = layer.keys.shape
            if isinstance(layer, MixedLayer):
                h = len(layer.kv_mask)
            per_token = b * h * (d + layer.values.shape[-1]) * layer.keys.element_size()
            total += per_token * layer.get_seq_length()
        return total

    def streaming_layer_indices(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, StreamingLayer)]

    # ---- batch bookkeeping (beam search, batch splitting) ----------------------------------------------------
    def selection_state(self, layer_idx: int) -> SelectionState:
        """The Selection Cache of full layer ``layer_idx`` (made on first use)."""
        state = self.selection_states.get(layer_idx)
        if state is None:
            state = self.selection_states[layer_idx] = SelectionState()
        return state

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.sequence.select(beam_idx)
        self.selection_states.clear()  # the rows moved: every layer selects afresh at its next step
        self.routing_states.clear()  # and rebuilds its key moments from the keys it holds

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.sequence.select(indices)
        self.selection_states.clear()
        self.routing_states.clear()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.selection_states.clear()
        self.routing_states.clear()
        if self.sequence.kv_start is not None:
            self.sequence.kv_start = self.sequence.kv_start.repeat_interleave(repeats, dim=0)

    # ---- online mode ----------------------------------------------------------------------------------------
    def make_streaming(self, layer_idx: int) -> None:
        """Turn full layer ``layer_idx`` into a streaming one now, dropping all but its sink + window tokens."""
        layer = self.layers[layer_idx]
        if isinstance(layer, StreamingLayer):
            return
        if not layer.is_initialized or layer.keys is None or layer.keys.numel() == 0:
            self.layers[layer_idx] = StreamingLayer(sink=self.sink, window=self.window, prefill=self.prefill,
                                                    sequence=self.sequence)
            return
        self.layers[layer_idx] = StreamingLayer.from_history(
            layer.keys, layer.values, sink=self.sink, window=self.window, prefill=self.prefill,
            sequence=self.sequence)


__all__ = ["HybridCache", "FullLayer", "StreamingLayer", "MixedLayer", "SequenceState", "StaticStep",
           "ContiguousView", "SlotView", "ChunkView", "leading_padding"]
