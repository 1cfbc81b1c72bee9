"""The cache of a full-attention layer: storage preallocated and grown geometrically, new tokens written in
place, views of the tokens seen returned, so that a decode step copies nothing but the new token."""

from __future__ import annotations

import torch

from .cache_state import CountingLayer, tensor_nbytes

GROWTH = 1.25
GROWTH_MIN_TOKENS = 1024
CAPACITY_ALIGN = 256


def _round_up(tokens: int, align: int = CAPACITY_ALIGN) -> int:
    return -(-int(tokens) // align) * align


class FullLayer(CountingLayer):
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

    # ---- static decode steps (see HybridCache.begin_static) ----------------------------------------------------
    def make_static(self, tokens: int) -> None:
        """Storage for ``tokens`` tokens, the unfilled part zeroed (a masked-out key must still be finite: its zero
        weight times a NaN would be NaN on the SDPA path), ready for :meth:`static_update`."""
        if self.capacity < tokens:
            self._reallocate(_round_up(tokens))
        self.key_storage[:, :, self.seen:].zero_()
        self.value_storage[:, :, self.seen:].zero_()

    def static_update(self, key_states: torch.Tensor, value_states: torch.Tensor, step) -> tuple:
        """Write one token ``[batch, kv_heads, 1, head_dim]`` at ``step.index`` (device memory) and return the
        whole storage ``[batch, kv_heads, capacity, head_dim]``, of which the first ``step.n_valid`` keys exist.
        ``seen`` is left to the caller (:meth:`HybridCache.advance`): nothing here reads the host."""
        self.key_storage.index_copy_(2, step.index, key_states)
        self.value_storage.index_copy_(2, step.index, value_states)
        return self.key_storage, self.value_storage

    def load_from(self, other: FullLayer) -> None:
        """``other``'s tokens copied into this layer's storage (same batch, heads and dtype; room enough)."""
        if other.seen > self.capacity or self.key_storage is None or other.keys is None \
                or other.keys.shape[:2] != self.key_storage.shape[:2] or other.keys.dtype != self.key_storage.dtype:
            raise ValueError("load_from: storage of another shape or too small")
        self.key_storage[:, :, : other.seen].copy_(other.keys)
        self.value_storage[:, :, : other.seen].copy_(other.values)
        self.seen = other.seen
        self._refresh_views()

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
        return tensor_nbytes(self.keys) + tensor_nbytes(self.values)

    def allocated_bytes(self) -> int:
        """Bytes of the storage, filled or not."""
        return tensor_nbytes(self.key_storage) + tensor_nbytes(self.value_storage)

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


__all__ = ["FullLayer", "GROWTH", "GROWTH_MIN_TOKENS", "CAPACITY_ALIGN"]
