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

from .cache_state import ChunkView, ContiguousView, SequenceState, SlotView, leading_padding, tensor_nbytes
from .full_layer import FullLayer
from .mixed_layer import MixedLayer
from .streaming_layer import StreamingLayer
from .token_select import SelectionState, SelectionStats


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
            decoding would) instead of attending densely (a prefill chunk).
    """

    def __init__(self, kinds, *, sink: int, window: int, prefill: str = "streaming", kv_head_masks=None,
                 online=None, native_windows: dict[int, int] | None = None, max_tokens: int | None = None,
                 selection=None, selection_stats: SelectionStats | None = None, select_chunks: bool = False) -> None:
        self.sequence = SequenceState()
        self.selection = selection
        self.select_chunks = bool(select_chunks)
        self.selection_stats = selection_stats if selection_stats is not None else SelectionStats()
        self.selection_states: dict[int, SelectionState] = {}
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

    def reserve(self, tokens: int) -> None:
        """Room for ``tokens`` tokens per sequence in every full layer and every mixed layer's full heads (now for
        layers that hold storage, at their first update otherwise). Call it before ``generate`` with
        prompt + ``max_new_tokens`` when the cache is made by hand (:func:`~lighttransfer.runtime.make_cache`)."""
        for layer in self.layers:
            if isinstance(layer, (FullLayer, MixedLayer)):
                layer.reserve(tokens)

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

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.sequence.select(indices)
        self.selection_states.clear()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.selection_states.clear()
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


__all__ = ["HybridCache", "FullLayer", "StreamingLayer", "MixedLayer", "SequenceState", "ContiguousView", "SlotView",
           "ChunkView", "leading_padding"]
