"""Which layers of a loaded model stream, with what sink, window and prefill policy: resolved for the runtime.

The checkpoint's ``lighttransfer`` block (:class:`~lighttransfer.hybrid_format.HybridConfig`) and/or explicit
options become one :class:`~lighttransfer.hybrid_format.HybridLayout`; explicit options win. Bad values get a
one-line :class:`LightTransferError`.
"""

from __future__ import annotations

import logging
from typing import Any

from ..architecture import check_window_fits
from ..architecture import model_shape as _shape
from ..errors import LightTransferError
from ..hybrid_format import (
    DEFAULT_SINK,
    DEFAULT_WINDOW,
    PREFILL_POLICIES,
    HybridConfig,
    HybridLayout,
    token_select_config,
)
from .online import DEFAULT_LAST

log = logging.getLogger(__name__)


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
    decode: str | None = None,
    select_k: int | None = None,
    select_init: int | None = None,
    select_local: int | None = None,
    select_reuse: float | None = None,
    select_reuse_max_age: int | None = None,
    select_reuse_against: str | None = None,
    source: str = "the model",
    alone: bool = False,
) -> HybridLayout:
    """Combine the checkpoint's block (if any) with explicit options into a :class:`HybridLayout` (the model's
    own sliding layers included, from its config).

    ``decode`` (``dense`` or ``tokenselect``) and the ``select_*`` settings override the block's; TokenSelect alone
    needs no block (a plain model: every layer full, each decoding with TokenSelect); ``alone`` says the same for
    an option of the full layers given beside (head routing).

    Raises:
        LightTransferError: no layout anywhere, or an option out of range.
    """
    shape = _shape(config, source=source)
    num_layers, num_kv_heads = shape.num_layers, shape.num_kv_heads
    block = HybridConfig.from_model_config(config, origin=f"config.json of {source}")
    explicit = streaming_layers is not None or head_masks is not None
    if online_ratio is not None and explicit:
        raise LightTransferError("pass either online_ratio (layers chosen per prompt) or streaming_layers/"
                                 "head_masks (a fixed layout), not both.")
    selection = token_select_config(decode, select_k=select_k, select_init=select_init, select_local=select_local,
                                    select_reuse=select_reuse, select_reuse_max_age=select_reuse_max_age,
                                    select_reuse_against=select_reuse_against, base=block.selection if block else None)
    if block is None and not explicit and online_ratio is None and (selection is not None or alone):
        explicit = True  # TokenSelect alone: nothing streams
    if block is None and not explicit and online_ratio is None:
        raise LightTransferError(
            f"{source} has no 'lighttransfer' block in its config.json; convert it first "
            "(lighttransfer convert) or pass an explicit layout (streaming_layers=[...]) or online_ratio.")
    if prefill is not None and prefill not in PREFILL_POLICIES:
        raise LightTransferError(f"prefill policy {prefill!r} is not known; use 'streaming' or 'full'.")

    sink = sink if sink is not None else (block.sink if block else DEFAULT_SINK)
    window = window if window is not None else (block.window if block else DEFAULT_WINDOW)
    prefill = prefill or (block.prefill if block else "streaming")
    check_window_fits(config, sink=sink, window=window, option="window")
    if block is not None:
        _warn_if_not_calibrated(block, sink=sink, window=window)

    if online_ratio is not None:
        if not 0.0 <= online_ratio <= 1.0:
            raise LightTransferError(f"online_ratio must be between 0 and 1, got {online_ratio}.")
        last = online_last or (block.calibration.get("last") if block else None) or DEFAULT_LAST
        return HybridLayout(num_layers=num_layers, num_kv_heads=num_kv_heads, sink=sink, window=window,
                            prefill="full", online_ratio=float(online_ratio), online_last=int(last),
                            native_windows=shape.native_windows, selection=selection)

    if explicit:
        return HybridLayout(num_layers=num_layers, num_kv_heads=num_kv_heads,
                            streaming_layers=list(streaming_layers or []), head_masks=dict(head_masks or {}),
                            sink=sink, window=window, prefill=prefill, native_windows=shape.native_windows,
                            selection=selection)
    assert block is not None
    if block.num_layers != num_layers or block.num_kv_heads != num_kv_heads:
        raise LightTransferError(
            f"{source}: its lighttransfer block describes {block.num_layers} layers x {block.num_kv_heads} KV "
            f"heads but the model has {num_layers} x {num_kv_heads}; reconvert the checkpoint.")
    # with --native-swa the config's own layer types mark our streaming layers: those are not the model's
    native = {} if block.native_swa else shape.native_windows
    return HybridLayout(num_layers=num_layers, num_kv_heads=num_kv_heads, streaming_layers=block.streaming_layers,
                        head_masks=block.head_masks, sink=sink, window=window, prefill=prefill,
                        native_windows=native, selection=selection)


def _warn_if_not_calibrated(block: HybridConfig, *, sink: int, window: int) -> None:
    calib = block.calibration or {}
    calib_sink, calib_window = calib.get("sink"), calib.get("window", calib.get("recent"))
    if calib_sink is not None and int(calib_sink) != sink:
        log.warning("sink %d differs from the %d tokens the layers were selected with; the selection may not "
                    "hold for it.", sink, calib_sink)
    if calib_window is not None and int(calib_window) != window:
        log.warning("window %d differs from the %d recent tokens the layers were selected with; the selection "
                    "may not hold for it.", window, calib_window)


__all__ = ["resolve_layout", "DEFAULT_SINK", "DEFAULT_WINDOW"]
