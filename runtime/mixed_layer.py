"""The cache of a layer whose KV heads are partly streaming, partly full: each group in its own layer."""

from __future__ import annotations

import torch

from .cache_state import CountingLayer, SequenceState, tensor_nbytes
from .full_layer import FullLayer
from .streaming_layer import StreamingLayer


class MixedLayer(CountingLayer):
    """KV cache of a layer where only some KV heads stream: no full-size copy of either group.

    The full KV heads keep their whole history contiguous in an inner :class:`FullLayer` (``keys``/``values``
    ``[batch, full_heads, T, D]`` are views of its preallocated storage); the streaming KV heads live in an inner
    :class:`StreamingLayer`
    (``[batch, streaming_heads, <= sink + window, D]``). ``update`` returns the full group's keys and values and
    leaves the streaming group's in :attr:`stream_kv` (with its positions in ``streaming.view``); the attention
    function runs the two groups separately and puts the query heads back in order.

    Args:
        kv_mask: per KV head, True = streams (at least one of each kind).
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, kv_mask, *, sink: int, window: int, prefill: str = "streaming",
                 sequence: SequenceState | None = None, reserve_tokens: int = 0) -> None:
        super().__init__()
        self.kv_mask = tuple(bool(x) for x in kv_mask)
        if all(self.kv_mask) or not any(self.kv_mask):
            raise ValueError("a mixed layer needs both streaming and full KV heads")
        self.full_heads = [i for i, s in enumerate(self.kv_mask) if not s]
        self.stream_heads = [i for i, s in enumerate(self.kv_mask) if s]
        # full heads first (the runtime reorders the weights so): each group is a view, no gather
        self.grouped = self.full_heads == list(range(len(self.full_heads)))
        self.streaming = StreamingLayer(sink=sink, window=window, prefill=prefill, sequence=sequence)
        self.full = FullLayer(reserve_tokens=reserve_tokens)
        self.seen = 0
        self.stream_kv: tuple[torch.Tensor, torch.Tensor] | None = None
        self._index: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def head_index(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(full KV head indices, streaming KV head indices)`` as int64 tensors on ``device``."""
        device = torch.device(device)
        if device not in self._index:
            self._index[device] = (torch.tensor(self.full_heads, device=device),
                                   torch.tensor(self.stream_heads, device=device))
        return self._index[device]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        full_k, _ = self.split_heads(key_states)
        full_v, _ = self.split_heads(value_states)
        self.full.lazy_initialization(full_k, full_v)
        self._sync_full()
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        full_k, stream_k = self.split_heads(key_states)
        full_v, stream_v = self.split_heads(value_states)
        self.full.update(full_k, full_v)
        self._sync_full()
        self.seen += key_states.shape[2]
        self.stream_kv = self.streaming.update(stream_k, stream_v)
        return self.keys, self.values

    def make_static(self, tokens: int) -> None:
        """Both groups ready for static steps (see :meth:`FullLayer.make_static`, :meth:`StreamingLayer.make_static`)."""
        self.full.make_static(tokens)
        self._sync_full()
        self.streaming.make_static()

    def static_update(self, key_states: torch.Tensor, value_states: torch.Tensor, step):
        """One token in both groups at the step's device index; returns the full heads' whole storage."""
        full_k, stream_k = self.split_heads(key_states)
        full_v, stream_v = self.split_heads(value_states)
        keys, values = self.full.static_update(full_k, full_v, step)
        self.stream_kv = self.streaming.static_update(stream_k, stream_v, step)
        return keys, values

    def load_from(self, other: MixedLayer) -> None:
        """``other``'s tokens in both head groups (see :meth:`FullLayer.load_from`)."""
        if other.kv_mask != self.kv_mask:
            raise ValueError("load_from: another head split")
        self.full.load_from(other.full)
        self.streaming.load_from(other.streaming)
        self._sync_full()
        self.seen = other.seen

    def reserve(self, tokens: int) -> None:
        """Room for ``tokens`` tokens in the full heads' storage (see :meth:`FullLayer.reserve`)."""
        self.full.reserve(tokens)
        self._sync_full()

    def _sync_full(self) -> None:
        self.keys, self.values = self.full.keys, self.full.values

    def split_heads(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``states [batch, kv_heads, n, D]`` split into ``(full KV heads, streaming KV heads)``: views when the
        heads are grouped, gathers otherwise."""
        if self.grouped:
            f = len(self.full_heads)
            return states[:, :f], states[:, f:]
        full_idx, stream_idx = self.head_index(states.device)
        return states.index_select(1, full_idx), states.index_select(1, stream_idx)

    def reset(self) -> None:
        self.full.reset()
        self._sync_full()
        self.stream_kv = None
        self.seen = 0
        self.is_initialized = False
        self.streaming.reset()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a mixed cache layer cannot be cropped: its streaming heads evicted tokens")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.full.batch_select_indices(indices)
        self._sync_full()
        self.streaming.batch_select_indices(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.full.batch_repeat_interleave(repeats)
        self._sync_full()
        self.streaming.batch_repeat_interleave(repeats)

    def nbytes(self) -> int:
        """Bytes held by both head groups (the full heads' ``seen`` tokens, the streaming heads' slots)."""
        return self.full.nbytes() + tensor_nbytes(self.streaming.keys) + tensor_nbytes(self.streaming.values)

    def allocated_bytes(self) -> int:
        """Bytes allocated by both head groups (the full heads' whole storage)."""
        return self.full.allocated_bytes() + tensor_nbytes(self.streaming.keys) + tensor_nbytes(self.streaming.values)


__all__ = ["MixedLayer"]
