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

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from ..hybrid_format import PREFILL_POLICIES
from .slots import slot_of, slot_positions


class SequenceState:
    """What every layer of one cache shares about the batch: left padding, and whether to defer compaction.

    Attributes:
        kv_start: int64 ``[batch]`` left-padding count of each sequence (its first real token's index), or
            ``None`` before the first forward. Position of the token at index ``j`` is ``j - kv_start[b]``.
        min_start, max_start: ``min(kv_start)`` and ``max(kv_start)`` as Python ints (so slot counts and the
            choice of the chunked-prefill path need no device sync).
        has_padding: whether any sequence is left-padded.
        defer_compaction: set by chunked prefill under the ``full`` prefill policy, so that streaming layers keep
            their whole history until the last chunk (full attention in prefill stays exact).
    """

    def __init__(self) -> None:
        self.kv_start: torch.Tensor | None = None
        self.min_start = 0
        self.max_start = 0
        self.has_padding = False
        self.defer_compaction = False

    def observe(self, attention_mask: torch.Tensor | None, batch: int, device: torch.device,
                new_tokens: int) -> torch.Tensor:
        """Record the left padding from the 2-D ``attention_mask`` ``[batch, past + new]`` (1 = real token).

        It is re-read on every multi-token forward, because the first chunks of a chunked prefill may still be all
        padding for some sequence (its count only grows until its first real token arrives); one-token forwards
        reuse it, so decoding needs no device sync. Returns ``kv_start``."""
        if attention_mask is not None and attention_mask.dim() == 2 and (self.kv_start is None or new_tokens > 1):
            self.kv_start = leading_padding(attention_mask).to(device)
            self.min_start = int(self.kv_start.min().item())
            self.max_start = int(self.kv_start.max().item())
            self.has_padding = self.max_start > 0
        elif self.kv_start is None:
            self.kv_start = torch.zeros(batch, dtype=torch.long, device=device)
        return self.kv_start

    def select(self, index: torch.Tensor) -> None:
        if self.kv_start is not None:
            self.kv_start = self.kv_start[index.to(self.kv_start.device)]


def leading_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """Number of leading zeros of each row of a 2-D mask ``[batch, seq]`` (int64 ``[batch]``).

    Only left padding shifts positions; zeros after the first real token (right padding) sit after every real
    query and are never seen by one under causal attention.
    """
    return (attention_mask.long().cumsum(-1) == 0).sum(-1)


@dataclass
class ContiguousView:
    """Keys returned by ``update`` are the whole history in index order: key ``j`` at position
    ``j - kv_start[b]``; the queries are keys ``q_offset ..``; ``full`` = full causal attention (prefill policy
    ``full``) instead of sink + window."""

    q_offset: int
    full: bool


@dataclass
class SlotView:
    """Keys returned by ``update`` are slots with explicit positions ``slot_pos`` (int32 ``[batch, N]``,
    ``-1`` = empty); the queries sit at ``q_pos`` (int32 ``[batch, n]``)."""

    slot_pos: torch.Tensor
    q_pos: torch.Tensor


@dataclass
class ChunkView:
    """A chunk of ``n`` new tokens against a ring whose sink is complete, split in two parts that the prefill
    kernel handles directly and whose softmaxes are merged by their log-sum-exp: the sink keys
    (``sink_keys``/``sink_values`` ``[B, Hkv, sink, D]``, seen by every query) and the keys ``update`` returned,
    ``[recent (window, oldest first), chunk]`` with contiguous positions, the first ``recent_start[b]`` of them
    empty (int32 ``[B]``), attended with sink 0 and the window."""

    sink_keys: torch.Tensor
    sink_values: torch.Tensor
    recent_start: torch.Tensor


class _CountingLayer(CacheLayerMixin):
    """A cache layer that reports every token it has seen, whatever it keeps, so that transformers' position
    and mask bookkeeping stays that of the dense model (``self.seen``: tokens processed so far)."""

    seen: int = 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1


# FullLayer storage growth: to max(GROWTH x, + GROWTH_MIN_TOKENS) tokens, rounded up to CAPACITY_ALIGN tokens.
# 1.25x (and at least 1024 tokens) rather than 2x (+4096): a long-context batch is sized to fill the GPU and the
# full layers hold most of its cache; 2x (or +4096 on a 4k prompt) could double them at the first decoded token.
# Growth stays geometric: O(log n) copies of the history, each worth ~2 decode steps of that layer's traffic,
# one every >= n/4 steps. A generation of known length avoids them with HybridCache(max_tokens=...)/reserve().
GROWTH = 1.25
GROWTH_MIN_TOKENS = 1024
CAPACITY_ALIGN = 256


def _round_up(tokens: int, align: int = CAPACITY_ALIGN) -> int:
    return -(-int(tokens) // align) * align


class FullLayer(_CountingLayer):
    """KV cache of one full layer: every token, in preallocated storage that ``update`` writes in place.

    Storage: ``[batch, kv_heads, capacity, head_dim]`` (:attr:`key_storage`, :attr:`value_storage`), of which the
    first ``seen`` tokens are filled; ``keys``/``values`` are views of those ``seen`` tokens (what transformers'
    ``DynamicLayer`` would hold, as a view instead of a fresh tensor). A step of ``n`` tokens copies only those
    ``n`` tokens; when they do not fit, the storage grows to ``max(GROWTH x, + GROWTH_MIN_TOKENS)`` tokens rounded
    up to ``CAPACITY_ALIGN`` (one copy of the history, ``O(log n)`` times over a generation), or to exactly what
    :meth:`reserve` asked for. Behaves as ``DynamicLayer`` otherwise: left padding is stored as it comes,
    ``crop`` drops the last tokens, beam search reorders the batch.

    Args:
        reserve_tokens: capacity to allocate at the first ``update`` (e.g. prompt + ``max_new_tokens``), so that a
            generation of known length allocates once.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, *, reserve_tokens: int = 0) -> None:
        super().__init__()
        self.seen = 0
        self.reserved = max(0, int(reserve_tokens))
        self.key_storage: torch.Tensor | None = None
        self.value_storage: torch.Tensor | None = None
        self.growths = 0  # storage (re)allocations that copied a non-empty history

    @property
    def capacity(self) -> int:
        return 0 if self.key_storage is None else self.key_storage.shape[2]

    # ---- transformers' layer interface ---------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        b, h, _, d = key_states.shape
        cap = _round_up(self.reserved) if self.reserved else 0
        self.key_storage = key_states.new_empty((b, h, cap, d))
        self.value_storage = value_states.new_empty((b, h, cap, value_states.shape[-1]))
        self.is_initialized = True
        self._refresh_views()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write ``key_states``/``value_states`` ``[batch, kv_heads, n, head_dim]`` after the ``seen`` tokens and
        return views of all of them (``[batch, kv_heads, seen + n, head_dim]``)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b = key_states.shape[0]
        if self.key_storage.shape[0] != b:
            if self.seen:
                raise ValueError(f"cache holds a batch of {self.key_storage.shape[0]}, got {b} new rows")
            self.lazy_initialization(key_states, value_states)  # an empty (early-initialized) layer: re-shape
        n = key_states.shape[2]
        end = self.seen + n
        if end > self.capacity:
            self._grow(end)
        self.key_storage[:, :, self.seen:end] = key_states
        self.value_storage[:, :, self.seen:end] = value_states
        self.seen = end
        self._refresh_views()
        return self.keys, self.values

    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` tokens in all (allocating now if the layer has storage, else at the first
        ``update``); never shrinks."""
        tokens = int(tokens)
        self.reserved = max(self.reserved, tokens)
        if self.is_initialized and tokens > self.capacity:
            self._reallocate(_round_up(tokens))

    def reset(self) -> None:
        self.key_storage = self.value_storage = None
        self.keys = self.values = None
        self.seen = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        """``DynamicLayer.crop``: remove the last ``-tokens_to_remove`` tokens (a positive value is refused)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"Calling `crop` with a positive value (`{tokens_to_remove}`) is not supported. "
                "Please use a negative integer to remove that number of tokens from the cache instead.")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self.seen = max(0, self.seen - abs(int(tokens_to_remove)))
        self._refresh_views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized or self.seen == 0:
            return
        indices = indices.to(self.key_storage.device)
        kept_k = self.keys[indices]  # [B', H, seen, D], a copy of the held tokens only
        kept_v = self.values[indices]
        if kept_k.shape[0] == self.key_storage.shape[0]:
            self.keys.copy_(kept_k)
            self.values.copy_(kept_v)
            return
        self._replace(kept_k, kept_v, self.capacity)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not self.is_initialized or self.seen == 0:
            return
        self._replace(self.keys.repeat_interleave(repeats, dim=0),
                      self.values.repeat_interleave(repeats, dim=0), self.capacity)

    def offload(self):
        if self.is_initialized:
            self.key_storage = self.key_storage.to("cpu", non_blocking=True)
            self.value_storage = self.value_storage.to("cpu", non_blocking=True)
            self._refresh_views()

    def prefetch(self):
        if self.is_initialized and self.key_storage.device != self.device:
            self.key_storage = self.key_storage.to(self.device, non_blocking=True)
            self.value_storage = self.value_storage.to(self.device, non_blocking=True)
            self._refresh_views()

    # ---- memory accounting ---------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of the ``seen`` tokens' keys and values (what the layer holds)."""
        return _nbytes(self.keys) + _nbytes(self.values)

    def allocated_bytes(self) -> int:
        """Bytes of the storage, filled or not."""
        return _nbytes(self.key_storage) + _nbytes(self.value_storage)

    # ---- internals -------------------------------------------------------------------------------------------
    def _refresh_views(self) -> None:
        if self.key_storage is None:
            self.keys = self.values = None
            return
        self.keys = self.key_storage[:, :, : self.seen]
        self.values = self.value_storage[:, :, : self.seen]

    def _grow(self, needed: int) -> None:
        cap = self.capacity
        target = max(needed, int(cap * GROWTH), cap + GROWTH_MIN_TOKENS)
        if self.reserved >= needed:
            target = max(needed, self.reserved)
        if self.seen:
            self.growths += 1
        self._reallocate(_round_up(target))

    def _reallocate(self, capacity: int) -> None:
        self._replace(self.keys, self.values, capacity)

    def _replace(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        """New storage of ``capacity`` tokens holding ``keys``/``values`` (the ``seen`` tokens, any batch)."""
        b, h, seen, d = keys.shape
        capacity = max(capacity, seen)
        key_storage = keys.new_empty((b, h, capacity, d))
        value_storage = values.new_empty((b, h, capacity, values.shape[-1]))
        if seen:
            key_storage[:, :, :seen] = keys
            value_storage[:, :, :seen] = values
        self.key_storage, self.value_storage = key_storage, value_storage
        self.seen = seen
        self._refresh_views()


class StreamingLayer(_CountingLayer):
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


class MixedLayer(_CountingLayer):
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
        return self.full.nbytes() + _nbytes(self.streaming.keys) + _nbytes(self.streaming.values)

    def allocated_bytes(self) -> int:
        """Bytes allocated by both head groups (the full heads' whole storage)."""
        return self.full.allocated_bytes() + _nbytes(self.streaming.keys) + _nbytes(self.streaming.values)


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
    """

    def __init__(self, kinds, *, sink: int, window: int, prefill: str = "streaming", kv_head_masks=None,
                 online=None, native_windows: dict[int, int] | None = None, max_tokens: int | None = None) -> None:
        self.sequence = SequenceState()
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
        total = 0
        for layer in self.layers:
            if isinstance(layer, (FullLayer, MixedLayer)):
                total += layer.nbytes()
            elif layer.is_initialized:
                total += _nbytes(layer.keys) + _nbytes(layer.values)
        return total

    def allocated_kv_bytes(self) -> int:
        """Bytes allocated for keys and values, over all layers: :meth:`kv_bytes` plus the full layers' storage
        that is not filled yet."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, (FullLayer, MixedLayer)):
                total += layer.allocated_bytes()
            elif layer.is_initialized:
                total += _nbytes(layer.keys) + _nbytes(layer.values)
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
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.sequence.select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.sequence.select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
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


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


__all__ = ["HybridCache", "FullLayer", "StreamingLayer", "MixedLayer", "SequenceState", "ContiguousView", "SlotView", "ChunkView", "leading_padding"]
