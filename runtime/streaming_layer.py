"""The cache of a streaming layer: ``sink`` fixed slots then a ring of ``window`` slots, each slot recording its
token's absolute position (the invariant in :mod:`lighttransfer.runtime.slots`)."""

from __future__ import annotations

import torch

from ..hybrid_format import PREFILL_POLICIES
from .cache_state import ChunkView, ContiguousView, CountingLayer, SequenceState, SlotView
from .slots import slot_of, slot_positions


class StreamingLayer(CountingLayer):
    """KV cache of one streaming layer: ``sink`` fixed slots then a ring of ``window`` slots.

    Storage: ``keys``/``values`` ``[batch, kv_heads, A, head_dim]`` with ``A <= sink + window`` (grown until
    full), ``slot_pos`` int32 ``[batch, A]``. Before the first compaction (the first forward, or the whole
    prefill under the ``full`` policy with deferred compaction) the history is kept contiguous and
    ``slot_pos`` is ``None``.

    Update rules (``n`` new tokens, positions from :class:`SequenceState`):
      * first forward: attend over the new tokens as they are (contiguous); then keep only the sink and the
        last ``window`` of them;
      * ``n == 1`` (decoding): write the token into its slot first (the token it evicts, ``window`` positions
        back, is invisible to it), then attend over the slots;
      * ``n > 1`` later (chunked prefill): attend over ``[slots, new tokens]``, then write the new tokens.
    """

    is_sliding = True
    is_compileable = False
    is_croppable = False

    def __init__(self, *, sink: int, window: int, prefill: str = "streaming",
                 sequence: SequenceState | None = None) -> None:
        super().__init__()
        if prefill not in PREFILL_POLICIES:
            raise ValueError(f"prefill policy must be one of {PREFILL_POLICIES}, got {prefill!r}")
        self.sink, self.window, self.prefill = int(sink), int(window), prefill
        self.sequence = sequence if sequence is not None else SequenceState()
        self.seen = 0
        self.slot_pos: torch.Tensor | None = None
        self.view: ContiguousView | SlotView | ChunkView | None = None

    @property
    def capacity(self) -> int:
        return self.sink + self.window

    # ---- transformers' layer interface ---------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        b, h, _, d = key_states.shape
        self.keys = key_states.new_empty((b, h, 0, d))
        self.values = value_states.new_empty((b, h, 0, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store ``key_states``/``value_states`` ``[batch, kv_heads, n, head_dim]`` and return the keys and values
        this step attends over (see the class docstring); sets :attr:`view`."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[2]
        past = self.seen
        kv_start = self._kv_start(key_states)
        self.seen = past + n
        if self.slot_pos is None:
            keys = torch.cat([self.keys, key_states], dim=2) if past else key_states
            values = torch.cat([self.values, value_states], dim=2) if past else value_states
            full = self.prefill == "full" and n > 1
            self.view = ContiguousView(q_offset=past, full=full)
            if full and self.sequence.defer_compaction:
                self.keys, self.values = keys, values
            else:
                self._compact(keys, values, kv_start)
            return keys, values
        if n == 1 and not self.sequence.has_padding:
            # every sequence is at the same position: index with a Python int (fewer kernel launches)
            self._write_one_aligned(key_states, value_states, past)
            q_pos = self.slot_pos.new_full((key_states.shape[0], 1), past)
            self.view = SlotView(slot_pos=self.slot_pos, q_pos=q_pos)
            return self.keys, self.values
        first = past - kv_start  # [B] position of the first new token
        q_pos = (first.unsqueeze(-1) + torch.arange(n, device=first.device)).to(torch.int32)
        if n == 1:
            self._write_one(key_states, value_states, q_pos[:, 0].long())
            self.view = SlotView(slot_pos=self.slot_pos, q_pos=q_pos)
            return self.keys, self.values
        if past - self.sequence.max_start >= self.sink and self.keys.shape[2] >= self.sink:
            keys, values = self._chunk_view(key_states, value_states, first)
        else:
            # some sequence has not reached its sink yet: attend over the slots with their positions
            keys = torch.cat([self.keys, key_states], dim=2)
            values = torch.cat([self.values, value_states], dim=2)
            slot_pos = torch.cat([self.slot_pos, q_pos.clamp(min=-1)], dim=1)
            self.view = SlotView(slot_pos=slot_pos, q_pos=q_pos)
        self._write_many(key_states, value_states, first)
        return keys, values

    def _chunk_view(self, key_states, value_states, first):
        """Keys ``[recent window oldest first, chunk]`` and the :class:`ChunkView` describing them."""
        r = torch.arange(self.window, device=first.device)
        pos = first.unsqueeze(-1) - self.window + r  # [B, W]: the window before the chunk, oldest first
        valid = pos >= self.sink  # older positions are sink slots (or nothing): a prefix of each row
        slot = torch.where(valid, self.sink + torch.remainder(pos - self.sink, self.window), torch.zeros_like(pos))
        slot = slot.clamp(max=self.keys.shape[2] - 1)
        keys = torch.cat([_gather_tokens(self.keys, slot), key_states], dim=2)
        values = torch.cat([_gather_tokens(self.values, slot), value_states], dim=2)
        self.view = ChunkView(sink_keys=self.keys[:, :, : self.sink], sink_values=self.values[:, :, : self.sink],
                              recent_start=(~valid).sum(-1).to(torch.int32))
        return keys, values

    # ---- static decode steps (see HybridCache.begin_static) ----------------------------------------------------
    def make_static(self) -> None:
        """All ``sink + window`` slots allocated now (empty ones at position -1), so the shapes stop changing."""
        self._grow(self.capacity)

    def static_update(self, key_states: torch.Tensor, value_states: torch.Tensor, step):
        """Write one token per sequence into the slot of its position ``step.q_pos`` (device memory) and return the
        slots (``[batch, kv_heads, sink + window, head_dim]``); sets :attr:`view`. The same write as the dynamic
        path's, by scatter instead of a host-computed slot."""
        self._write_one(key_states, value_states, step.q_pos[:, 0])
        self.view = SlotView(slot_pos=self.slot_pos, q_pos=step.q_pos)
        return self.keys, self.values

    def load_from(self, other: StreamingLayer) -> None:
        """``other``'s slots copied into this layer's (all ``sink + window`` allocated; same batch and heads)."""
        if self.slot_pos is None or other.slot_pos is None or self.keys.shape[2] != self.capacity \
                or other.keys.shape[:2] != self.keys.shape[:2] or other.keys.dtype != self.keys.dtype:
            raise ValueError("load_from: slots of another shape, or not compacted yet")
        n = other.keys.shape[2]
        self.keys[:, :, :n].copy_(other.keys)
        self.values[:, :, :n].copy_(other.values)
        self.slot_pos[:, :n].copy_(other.slot_pos)
        self.keys[:, :, n:].zero_()
        self.values[:, :, n:].zero_()
        self.slot_pos[:, n:].fill_(-1)
        self.seen = other.seen

    def reset(self) -> None:
        self.keys = self.values = None
        self.slot_pos = None
        self.view = None
        self.seen = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a streaming cache layer cannot be cropped: evicted tokens are gone")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)
            if self.slot_pos is not None:
                self.slot_pos = self.slot_pos.repeat_interleave(repeats, dim=0)

    # ---- internals -------------------------------------------------------------------------------------------
    def _kv_start(self, key_states: torch.Tensor) -> torch.Tensor:
        seq = self.sequence
        if seq.kv_start is None or seq.kv_start.shape[0] != key_states.shape[0]:
            seq.kv_start = torch.zeros(key_states.shape[0], dtype=torch.long, device=key_states.device)
            seq.min_start, seq.max_start, seq.has_padding = 0, 0, False
        return seq.kv_start

    def _n_slots(self) -> int:
        """Slots needed after ``seen`` tokens: the longest sequence has ``seen - min_start`` real tokens."""
        return max(0, min(self.capacity, self.seen - self.sequence.min_start))

    def _compact(self, keys: torch.Tensor, values: torch.Tensor, kv_start: torch.Tensor) -> None:
        """Keep the sink and the last ``window`` tokens of a contiguous history ``[B, H, L, D]``."""
        last = keys.shape[2] - 1 - kv_start
        n_slots = self._n_slots()
        pos = slot_positions(last, n_slots, sink=self.sink, window=self.window)  # [B, A]
        src = torch.where(pos >= 0, pos + kv_start.unsqueeze(-1), torch.zeros_like(pos))
        self.keys = _gather_tokens(keys, src)
        self.values = _gather_tokens(values, src)
        self.slot_pos = pos.to(torch.int32)

    def _grow(self, n_slots: int) -> None:
        extra = n_slots - self.keys.shape[2]
        if extra <= 0:
            return
        b, h, _, d = self.keys.shape
        self.keys = torch.cat([self.keys, self.keys.new_zeros((b, h, extra, d))], dim=2)
        self.values = torch.cat([self.values, self.values.new_zeros((b, h, extra, self.values.shape[-1]))], dim=2)
        self.slot_pos = torch.cat([self.slot_pos, self.slot_pos.new_full((b, extra), -1)], dim=1)

    def _write_one(self, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor) -> None:
        """Scatter one new token per sequence (``pos`` int64 ``[B]``) into its slot; no device sync."""
        self._grow(self._n_slots())
        # a sequence with no real token yet (pos < 0) writes into slot 0 and marks it empty
        slot = slot_of(pos.clamp(min=0), sink=self.sink, window=self.window)
        b, h, _, d = key.shape
        self.keys.scatter_(2, slot.view(b, 1, 1, 1).expand(b, h, 1, d), key)
        self.values.scatter_(2, slot.view(b, 1, 1, 1).expand(b, h, 1, value.shape[-1]), value)
        self.slot_pos.scatter_(1, slot.view(b, 1), pos.clamp(min=-1).to(torch.int32).view(b, 1))

    def _write_one_aligned(self, key: torch.Tensor, value: torch.Tensor, pos: int) -> None:
        """Write one new token at the same position ``pos`` for every sequence (no left padding)."""
        self._grow(self._n_slots())
        slot = pos if pos < self.sink else self.sink + (pos - self.sink) % self.window
        self.keys[:, :, slot:slot + 1] = key
        self.values[:, :, slot:slot + 1] = value
        self.slot_pos[:, slot] = pos

    def _write_many(self, keys: torch.Tensor, values: torch.Tensor, first: torch.Tensor) -> None:
        """Write ``n`` new tokens (positions ``first[b] ..``) into the ring, keeping older slots they do not
        replace."""
        n = keys.shape[2]
        self._grow(self._n_slots())
        target = slot_positions(first + n - 1, self.keys.shape[2], sink=self.sink, window=self.window)
        from_new = target >= first.unsqueeze(-1)
        src = (target - first.unsqueeze(-1)).clamp(0, n - 1)
        pick = from_new.view(*from_new.shape[:1], 1, from_new.shape[1], 1)
        self.keys = torch.where(pick, _gather_tokens(keys, src), self.keys)
        self.values = torch.where(pick, _gather_tokens(values, src), self.values)
        self.slot_pos = target.to(torch.int32)

    def _select(self, index: torch.Tensor) -> None:
        if self.is_initialized:
            index = index.to(self.keys.device)
            self.keys = self.keys.index_select(0, index)
            self.values = self.values.index_select(0, index)
            if self.slot_pos is not None:
                self.slot_pos = self.slot_pos.index_select(0, index)

    @classmethod
    def from_history(cls, keys: torch.Tensor, values: torch.Tensor, *, sink: int, window: int, prefill: str,
                     sequence: SequenceState) -> StreamingLayer:
        """A streaming layer built from a full layer's contiguous history ``[B, H, L, D]`` (online mode)."""
        layer = cls(sink=sink, window=window, prefill=prefill, sequence=sequence)
        layer.lazy_initialization(keys, values)
        layer.seen = keys.shape[2]
        layer._compact(keys, values, layer._kv_start(keys))
        return layer


def _gather_tokens(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``states [B, H, L, D]`` gathered along the token axis at ``index [B, A]`` -> ``[B, H, A, D]``."""
    b, h, _, d = states.shape
    idx = index.view(b, 1, -1, 1).expand(b, h, index.shape[1], d)
    return torch.gather(states, 2, idx)


__all__ = ["StreamingLayer"]
