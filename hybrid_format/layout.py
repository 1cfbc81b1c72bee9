"""The hybrid layout in memory: which KV heads of which layers stream, with what sink, window and prefill.

One type for every stage that runs or measures a hybrid: the runtime runs it, the masked reference and the
evaluation rows mask with it, the benchmark sizes it; the checkpoint's ``lighttransfer`` block
(:class:`~lighttransfer.hybrid_format.config_block.HybridConfig`) stores it with its provenance. Its KV-cache
size is :mod:`~lighttransfer.hybrid_format.kv_size`'s one formula.

A streaming KV head keeps, for a query at position ``p``, the keys at positions ``< sink`` and in
``(p - window, p]`` (the rule of :func:`lighttransfer.kernels.mask.streaming_visible`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from ..errors import LightTransferError
from .token_select import TokenSelectConfig

DEFAULT_SINK = 4
DEFAULT_WINDOW = 1020
DEFAULT_ONLINE_LAST = 32
PREFILL_POLICIES = ("streaming", "full")
LayerKind = Literal["full", "streaming", "mixed", "online"]


@dataclass(frozen=True)
class HybridLayout:
    """Which KV heads of which layers stream.

    Attributes:
        num_layers: decoder layers in the model.
        num_kv_heads: key/value heads per layer.
        streaming_layers: sorted indices of layers whose every KV head streams.
        head_masks: ``{layer: (bool,) * num_kv_heads}`` for layers that mix streaming and full KV heads (True =
            that KV head streams); a layer is in at most one of ``streaming_layers`` and ``head_masks``.
        sink: initial tokens every streaming query keeps (>= 0).
        window: most recent tokens every streaming query keeps, its own included (>= 1).
        prefill: ``streaming`` (sink + window in prefill too) or ``full`` (full prefill, cache trimmed after).
        online_ratio: share of layers streamed when they are chosen per prompt from its own lazy ratios
            (``None``: the fixed layout above; with a ratio, ``streaming_layers`` and ``head_masks`` are empty).
        online_last: prompt queries whose lazy ratio decides, in online mode.
        native_windows: ``{layer: window}`` of the model's own sliding layers (never ours: bounded in the
            original too, and left as they are).
        selection: how the full layers decode: ``None`` = every cached key (dense), or TokenSelect's settings
            (:class:`~lighttransfer.hybrid_format.token_select.TokenSelectConfig`); memory is unchanged either way.
    """

    num_layers: int
    num_kv_heads: int
    streaming_layers: tuple[int, ...] = ()
    head_masks: Mapping[int, tuple[bool, ...]] = field(default_factory=dict)
    sink: int = DEFAULT_SINK
    window: int = DEFAULT_WINDOW
    prefill: str = "streaming"
    online_ratio: float | None = None
    online_last: int = DEFAULT_ONLINE_LAST
    native_windows: Mapping[int, int] = field(default_factory=dict)
    selection: TokenSelectConfig | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "streaming_layers", tuple(sorted(int(i) for i in self.streaming_layers)))
        set_(self, "head_masks", {int(k): tuple(bool(x) for x in v) for k, v in sorted(self.head_masks.items())})
        set_(self, "native_windows", {int(k): int(v) for k, v in sorted(self.native_windows.items())})
        self.validate()

    # ---- queries ---------------------------------------------------------------------------------------------
    def layer_kind(self, layer: int) -> LayerKind:
        """``streaming`` when every KV head of ``layer`` streams, ``mixed`` when some do, ``online`` in online mode
        (decided per prompt), else ``full``."""
        if self.online_ratio is not None:
            return "online"
        if layer in self.streaming_layers:
            return "streaming"
        mask = self.head_masks.get(layer)
        if mask is None or not any(mask):
            return "full"
        return "streaming" if all(mask) else "mixed"

    @property
    def kinds(self) -> tuple[LayerKind, ...]:
        """:meth:`layer_kind` of every layer."""
        return tuple(self.layer_kind(i) for i in range(self.num_layers))

    def kv_head_mask(self, layer: int) -> tuple[bool, ...]:
        """``[num_kv_heads]`` booleans, True where that KV head of ``layer`` streams (fixed layouts)."""
        if layer in self.streaming_layers:
            return (True,) * self.num_kv_heads
        return tuple(self.head_masks.get(layer, (False,) * self.num_kv_heads))

    @property
    def mixed_masks(self) -> dict[int, tuple[bool, ...]]:
        """``{layer: mask}`` of the layers where some but not all KV heads stream."""
        return {i: m for i, m in self.head_masks.items() if any(m) and not all(m)}

    @property
    def streaming_kv_heads(self) -> int:
        """How many (layer, KV head) pairs stream, model-wide (online: as many as ``online_ratio`` of the
        layers whole)."""
        if self.online_ratio is not None:
            return self.num_streaming_layers * self.num_kv_heads
        return sum(sum(self.kv_head_mask(i)) for i in range(self.num_layers))

    @property
    def num_streaming_layers(self) -> int:
        """Whole layers that stream (online: ``round(online_ratio * num_layers)``)."""
        if self.online_ratio is not None:
            return round(self.online_ratio * self.num_layers)
        return len(self.streaming_layers) + sum(1 for m in self.head_masks.values() if m and all(m))

    @property
    def is_dense(self) -> bool:
        """Nothing streams and the full layers decode densely: the original model."""
        return self.online_ratio is None and self.streaming_kv_heads == 0 and self.selection is None

    def kv_fraction(self, tokens: int) -> float:
        """KV-cache entries kept after ``tokens`` tokens as a fraction of the original model's (sink + window
        included; the model's own sliding layers bounded on both sides). With a full prefill the peak during the
        prefill is the original's; this is what the cache holds after it."""
        from .kv_size import kv_cache_bytes

        original, kept = kv_cache_bytes(self, head_dim=1, dtype_bytes=1, tokens=max(1, int(tokens)))
        return kept / original if original else 1.0

    def describe(self) -> str:
        """One line for logs and tables."""
        if self.online_ratio is not None:
            return (f"online: {self.online_ratio:.0%} of {self.num_layers} layers stream, chosen per prompt "
                    f"(sink {self.sink}, window {self.window})")
        parts = [f"{len(self.streaming_layers)}/{self.num_layers} layers stream"]
        if self.mixed_masks:
            parts.append(f"{len(self.mixed_masks)} mixed")
        line = ", ".join(parts) + f" (sink {self.sink}, window {self.window}, prefill {self.prefill})"
        return line + (f"; full layers decode with {self.selection.describe()}" if self.selection else "")

    # ---- validation ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`LightTransferError` when the layout is inconsistent."""
        for name in ("num_layers", "num_kv_heads", "sink", "window"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise LightTransferError(f"{name} must be a whole number, got {getattr(self, name)!r}.")
        if self.window < 1:
            raise LightTransferError(f"window must be at least 1 token, got {self.window}.")
        if self.sink < 0:
            raise LightTransferError(f"sink must be 0 or more tokens, got {self.sink}.")
        if self.selection is not None and not isinstance(self.selection, TokenSelectConfig):
            raise LightTransferError(f"selection must be a TokenSelectConfig or None, got {self.selection!r}.")
        if self.prefill not in PREFILL_POLICIES:
            raise LightTransferError(f"prefill policy must be 'streaming' or 'full', got {self.prefill!r}.")
        bad = [i for i in [*self.streaming_layers, *self.head_masks] if not 0 <= i < self.num_layers]
        if bad:
            raise LightTransferError(f"layer indices {bad} are out of range for a model with {self.num_layers} "
                                     f"layers (0..{self.num_layers - 1}).")
        if len(set(self.streaming_layers)) != len(self.streaming_layers):
            raise LightTransferError(f"streaming_layers has duplicates: {list(self.streaming_layers)}.")
        for layer, mask in self.head_masks.items():
            if len(mask) != self.num_kv_heads:
                raise LightTransferError(f"head mask of layer {layer} has {len(mask)} entries; the model has "
                                         f"{self.num_kv_heads} KV heads.")
            if layer in self.streaming_layers:
                raise LightTransferError(f"layer {layer} is both fully streaming and head-masked; pick one.")
        ours = set(self.streaming_layers) | {i for i, m in self.head_masks.items() if any(m)}
        if self.online_ratio is not None:
            if not 0.0 <= self.online_ratio <= 1.0:
                raise LightTransferError(f"online_ratio must be between 0 and 1, got {self.online_ratio}.")
            if ours:
                raise LightTransferError("pass either online_ratio (layers chosen per prompt) or streaming_layers/"
                                         "head_masks (a fixed layout), not both.")


__all__ = ["HybridLayout", "LayerKind", "DEFAULT_SINK", "DEFAULT_WINDOW", "DEFAULT_ONLINE_LAST",
           "PREFILL_POLICIES"]
