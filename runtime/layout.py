"""Which layers of a loaded model stream, with what sink, window and prefill policy: the runtime's layout.

Resolved from the checkpoint's ``lighttransfer`` block (:class:`~lighttransfer.convert.hybrid_config.HybridConfig`)
and/or explicit options; explicit options win. Bad values get a one-line :class:`LightTransferError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ..convert.hybrid_config import HybridConfig
from ..errors import LightTransferError
from .cache import PREFILL_POLICIES
from .online import DEFAULT_LAST

log = logging.getLogger(__name__)

DEFAULT_SINK = 4
DEFAULT_WINDOW = 1020


@dataclass(frozen=True)
class RuntimeLayout:
    """The runtime's view of a hybrid model.

    Attributes:
        kinds: per decoder layer ``full``, ``streaming``, ``mixed`` (some KV heads stream) or ``online``.
        sink, window: tokens a streaming layer keeps: the first ``sink`` and the last ``window`` (own included).
        prefill: ``streaming`` (sink + window in prefill too) or ``full`` (full prefill, cache trimmed after).
        kv_head_masks: ``{layer: (bool,) * kv_heads}`` for mixed layers (True = that KV head streams).
        online_ratio: share of layers streamed when they are chosen per prompt (``None``: fixed layout).
        online_last: prompt queries whose lazy ratio decides, in online mode.
        chunk_size: prefill chunk length ``generate`` uses (``None``: one pass).
    """

    kinds: tuple[str, ...]
    sink: int
    window: int
    prefill: str = "streaming"
    kv_head_masks: dict[int, tuple[bool, ...]] = field(default_factory=dict)
    online_ratio: float | None = None
    online_last: int = DEFAULT_LAST
    chunk_size: int | None = None

    @property
    def num_layers(self) -> int:
        return len(self.kinds)

    @property
    def streaming_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.kinds) if kind == "streaming"]

    @property
    def mixed_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.kinds) if kind == "mixed"]

    def describe(self) -> str:
        if self.online_ratio is not None:
            return (f"online: {self.online_ratio:.0%} of {self.num_layers} layers stream, chosen per prompt "
                    f"(sink {self.sink}, window {self.window})")
        parts = [f"{len(self.streaming_layers)}/{self.num_layers} layers stream"]
        if self.mixed_layers:
            parts.append(f"{len(self.mixed_layers)} mixed")
        return ", ".join(parts) + f" (sink {self.sink}, window {self.window}, prefill {self.prefill})"


def model_shape(config: Any) -> tuple[int, int]:
    """``(num_layers, num_kv_heads)`` of a transformers config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = int(text.num_hidden_layers)
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return layers, int(kv_heads)


def resolve_layout(
    config: Any,
    *,
    streaming_layers: list[int] | None = None,
    head_masks: dict[int, list[bool]] | None = None,
    sink: int | None = None,
    window: int | None = None,
    prefill: str | None = None,
    online_ratio: float | None = None,
    online_last: int | None = None,
    chunk_size: int | None = None,
    source: str = "the model",
) -> RuntimeLayout:
    """Combine the checkpoint's block (if any) with explicit options into a :class:`RuntimeLayout`.

    Raises:
        LightTransferError: no layout anywhere, or an option out of range.
    """
    num_layers, num_kv_heads = model_shape(config)
    block = HybridConfig.from_model_config(config)
    explicit = streaming_layers is not None or head_masks is not None
    if online_ratio is not None and explicit:
        raise LightTransferError("pass either online_ratio (layers chosen per prompt) or streaming_layers/"
                                 "head_masks (a fixed layout), not both.")
    if block is None and not explicit and online_ratio is None:
        raise LightTransferError(
            f"{source} has no 'lighttransfer' block in its config.json; convert it first "
            "(lighttransfer convert) or pass an explicit layout (streaming_layers=[...]) or online_ratio.")
    if prefill is not None and prefill not in PREFILL_POLICIES:
        raise LightTransferError(f"prefill policy {prefill!r} is not known; use 'streaming' or 'full'.")
    if chunk_size is not None and chunk_size < 1:
        raise LightTransferError(f"chunk_size must be a positive number of tokens, got {chunk_size}.")

    sink = sink if sink is not None else (block.sink if block else DEFAULT_SINK)
    window = window if window is not None else (block.window if block else DEFAULT_WINDOW)
    prefill = prefill or (block.prefill if block else "streaming")
    if block is not None:
        _warn_if_not_calibrated(block, sink=sink, window=window)

    if online_ratio is not None:
        if not 0.0 <= online_ratio <= 1.0:
            raise LightTransferError(f"online_ratio must be between 0 and 1, got {online_ratio}.")
        HybridConfig(num_layers=num_layers, num_kv_heads=num_kv_heads, sink=sink, window=window, prefill=prefill)
        last = online_last or (block.calibration.get("last") if block else None) or DEFAULT_LAST
        return RuntimeLayout(kinds=("online",) * num_layers, sink=sink, window=window, prefill="full",
                             online_ratio=float(online_ratio), online_last=int(last), chunk_size=chunk_size)

    if explicit:
        hybrid = HybridConfig(num_layers=num_layers, num_kv_heads=num_kv_heads,
                              streaming_layers=list(streaming_layers or []), head_masks=dict(head_masks or {}),
                              sink=sink, window=window, prefill=prefill)
    else:
        assert block is not None
        if block.num_layers != num_layers or block.num_kv_heads != num_kv_heads:
            raise LightTransferError(
                f"{source}: its lighttransfer block describes {block.num_layers} layers x {block.num_kv_heads} KV "
                f"heads but the model has {num_layers} x {num_kv_heads}; reconvert the checkpoint.")
        hybrid = HybridConfig(num_layers=num_layers, num_kv_heads=num_kv_heads,
                              streaming_layers=block.streaming_layers, head_masks=block.head_masks,
                              sink=sink, window=window, prefill=prefill)
    kinds = tuple(hybrid.layer_kind(i) for i in range(num_layers))
    masks = {i: tuple(hybrid.kv_head_mask(i)) for i, kind in enumerate(kinds) if kind == "mixed"}
    return RuntimeLayout(kinds=kinds, sink=sink, window=window, prefill=prefill, kv_head_masks=masks,
                         chunk_size=chunk_size)


def _warn_if_not_calibrated(block: HybridConfig, *, sink: int, window: int) -> None:
    calib = block.calibration or {}
    calib_sink, calib_window = calib.get("sink"), calib.get("recent", calib.get("window"))
    if calib_sink is not None and int(calib_sink) != sink:
        log.warning("sink %d differs from the %d tokens the layers were selected with; the selection may not "
                    "hold for it.", sink, calib_sink)
    if calib_window is not None and int(calib_window) != window:
        log.warning("window %d differs from the %d recent tokens the layers were selected with; the selection "
                    "may not hold for it.", window, calib_window)


__all__ = ["RuntimeLayout", "resolve_layout", "model_shape", "DEFAULT_SINK", "DEFAULT_WINDOW"]
