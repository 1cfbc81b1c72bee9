"""The ``lighttransfer`` block of a hybrid checkpoint's ``config.json``.

This block is the contract between ``convert`` (which writes it) and the readers (``runtime``, ``inspect``,
``eval``, ``bench``): all of them import it from here, the ground floor. In memory it becomes a
:class:`~lighttransfer.hybrid_format.layout.HybridLayout` (:meth:`HybridConfig.layout`). It is
namespaced under one key so that plain transformers loads the checkpoint as the dense model and keeps the
block through ``from_pretrained`` -> ``save_pretrained``::

    "lighttransfer": {
      "format_version": 1,
      "streaming_layers": [3, 5, 7],           # layers whose every KV head streams
      "head_masks": {"12": [true, false, ...]}, # optional: per layer, per KV head (true = streams)
      "sink": 4, "window": 1020,               # tokens kept: the first `sink` + the last `window`
      "prefill": "streaming",                  # or "full" (full attention in prefill, cache trimmed after)
      "granularity": "layer",                  # or "head"
      "source": {"model_id": ..., "fingerprint": ...},
      "calibration": {"sink": 4, "window": 1020, "last": 32, ...},  # what the layers were chosen with
      "report_summary": {...},                 # small: lazy ratios per layer, ranking
      "sidecar": "lighttransfer_scores.json",  # bulky per-head scores beside the weights, or null
      "native_swa": false,                     # true when layer_types/sliding_window were also written
      "decode": "tokenselect",                 # format 2 only: how the full layers decode (absent = dense)
      "select_k": 2048, "select_init": 128, "select_local": 512, "select_reuse": 0.9,
                                               # "select_reuse_max_age": 64 (optional, written when not 64)
                                               # "select_reuse_against": "anchor" (optional, written when "previous")
      "sparse_prefill": {...},                 # optional: block-sparse prefill of the full layers
                                               # (hybrid_format/sparse_prefill.py; absent = dense)
      "head_routing": {...}                    # optional: per-query KV-head routing of the full layers' decode
    }                                          # (hybrid_format/head_routing.py; absent = dense)

Versions: a block without a TokenSelect decode is written as format 1, exactly as before, so older readers load
it; one with ``decode: "tokenselect"`` is format 2 (older readers refuse it with their version message instead of
silently decoding densely). Both versions are read.

A fine-tuned checkpoint keeps this block as it was and records the fine-tune beside it, under its own key
(``"lighttransfer_finetune"``, :mod:`.finetune_record`), so every reader of the block, older ones included, reads
it unchanged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..errors import LightTransferError
from .head_routing import HeadRoutingConfig
from .layout import HybridLayout
from .sparse_prefill import SparsePrefillConfig
from .token_select import (
    DECODE_POLICIES,
    DEFAULT_SELECT_REUSE_AGAINST,
    DEFAULT_SELECT_REUSE_MAX_AGE,
    TokenSelectConfig,
)

CONFIG_KEY = "lighttransfer"
FORMAT_VERSION = 2  # the newest version this lighttransfer writes and reads
READABLE_VERSIONS = (1, 2)
_DECODE_FIELDS = ("decode", "select_k", "select_init", "select_local", "select_reuse")
# optional TokenSelect fields: absent = the default (blocks written before them stay valid), and written only when
# not the default, so that older readers still read a block that does not need them
_OPTIONAL_DECODE_FIELDS = {"select_reuse_max_age": DEFAULT_SELECT_REUSE_MAX_AGE,
                           "select_reuse_against": DEFAULT_SELECT_REUSE_AGAINST}
SIDECAR_NAME = "lighttransfer_scores.json"
# the sidecar's own version (per-head scores beside the weights; its keys: format_version, model_id, fingerprint,
# params, layer_lazy_ratios, kv_head_long_context_scores, head_lazy_ratios)
SIDECAR_FORMAT_VERSION = 1
PrefillPolicy = Literal["streaming", "full"]
Granularity = Literal["layer", "head"]


@dataclass
class HybridConfig:
    """Which layers (and optionally which KV heads) of a model use sink + sliding-window attention.

    Attributes:
        num_layers: decoder layers in the model.
        num_kv_heads: key/value heads per layer.
        streaming_layers: sorted indices of layers whose every KV head streams.
        head_masks: ``{layer: [bool] * num_kv_heads}`` for layers that mix streaming and full KV heads
            (True = that KV head streams). A layer appears in at most one of ``streaming_layers`` and
            ``head_masks``.
        sink: number of initial tokens every streaming query keeps (>= 0).
        window: number of most recent tokens every streaming query keeps, its own included (>= 1).
        prefill: ``streaming`` (sink + window in prefill too) or ``full`` (full prefill, cache trimmed after).
        granularity: ``layer`` or ``head``; how the selection was made.
        source: ``{"model_id", "fingerprint"}`` of the dense model this came from.
        calibration: analysis parameters the selection was made with (sink, window, last, seq_len, ...; older blocks say recent).
        report_summary: small summary of the analysis (per-layer lazy ratios, ranking).
        sidecar: file name of the bulky per-head scores beside the weights, or ``None``.
        native_swa: the architecture's own ``layer_types`` + ``sliding_window`` fields were also written, so
            stock loaders slide a window (without sinks) over ``streaming_layers``.
        head_order: ``{layer: [original KV head of each slot]}`` for layers whose heads the runtime reordered in
            the weights before they were saved (empty for what ``convert`` writes): such weights are no longer
            in the source model's head order, so ``source`` and any report on it no longer index them.
        decode: ``dense`` (every cached key) or ``tokenselect`` (the full layers' decode steps attend the
            ``select_k`` keys of largest soft vote plus ``select_init`` first and ``select_local`` recent ones;
            Selection Cache threshold ``select_reuse``, reuse for at most ``select_reuse_max_age`` steps, ``None`` =
            the default 64; each query compared with the selection's anchor query or the previous one,
            ``select_reuse_against``, ``None`` = the default ``anchor``). The ``select_*`` fields are ``None`` for a
            dense decode.
        sparse_prefill: block-sparse prefill of the full layers (a
            :class:`~lighttransfer.hybrid_format.sparse_prefill.SparsePrefillConfig` as a dict), or ``None``
            (dense; the key is then left out of the block).
        head_routing: per-query KV-head routing of the full layers' decode steps (a
            :class:`~lighttransfer.hybrid_format.head_routing.HeadRoutingConfig` as a dict), or ``None`` (dense;
            left out of the block).
    """

    num_layers: int
    num_kv_heads: int
    streaming_layers: list[int] = field(default_factory=list)
    head_masks: dict[int, list[bool]] = field(default_factory=dict)
    sink: int = 4
    window: int = 1020
    prefill: PrefillPolicy = "streaming"
    granularity: Granularity = "layer"
    source: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    report_summary: dict[str, Any] = field(default_factory=dict)
    sidecar: str | None = None
    native_swa: bool = False
    head_order: dict[int, list[int]] = field(default_factory=dict)
    decode: str = "dense"
    select_k: int | None = None
    select_init: int | None = None
    select_local: int | None = None
    select_reuse: float | None = None
    select_reuse_max_age: int | None = None
    select_reuse_against: str | None = None
    sparse_prefill: dict[str, Any] | None = None
    head_routing: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        try:
            self.streaming_layers = sorted(int(i) for i in self.streaming_layers)
            self.head_masks = {int(k): [bool(x) for x in v] for k, v in dict(self.head_masks).items()}
            self.head_order = {int(k): [int(x) for x in v] for k, v in dict(self.head_order or {}).items()}
            self.sink, self.window = _whole(self.sink, "sink"), _whole(self.window, "window")
            self.num_layers = _whole(self.num_layers, "num_layers")
            self.num_kv_heads = _whole(self.num_kv_heads, "num_kv_heads")
        except (TypeError, ValueError, AttributeError) as exc:
            raise LightTransferError(f"a value has the wrong type ({exc})") from exc
        if self.sparse_prefill is not None:
            self.sparse_prefill = SparsePrefillConfig.from_dict(self.sparse_prefill).to_dict()
        if self.head_routing is not None:
            self.head_routing = HeadRoutingConfig.from_dict(self.head_routing).to_dict()
        self.validate()
        # the version is what the block needs: 1 unless the decode is TokenSelect (see the module docstring)
        self.format_version = 2 if self.decode == "tokenselect" else 1

    # ---- the layout ----------------------------------------------------------------------------------------
    def layout(self, *, native_windows: dict[int, int] | None = None, prefill: str | None = None) -> HybridLayout:
        """The block's layout in memory (``native_windows``: the model's own sliding layers, from its config)."""
        return HybridLayout(num_layers=self.num_layers, num_kv_heads=self.num_kv_heads,
                            streaming_layers=self.streaming_layers, head_masks=self.head_masks, sink=self.sink,
                            window=self.window, prefill=prefill or self.prefill, native_windows=native_windows or {},
                            selection=self.selection)

    @property
    def selection(self) -> TokenSelectConfig | None:
        """The full layers' TokenSelect settings, or ``None`` for a dense decode."""
        if self.decode != "tokenselect":
            return None
        age, against = self.select_reuse_max_age, self.select_reuse_against
        return TokenSelectConfig(k=self.select_k, init=self.select_init, local=self.select_local,
                                 reuse=self.select_reuse,
                                 reuse_max_age=DEFAULT_SELECT_REUSE_MAX_AGE if age is None else age,
                                 reuse_against=DEFAULT_SELECT_REUSE_AGAINST if against is None else against)

    def with_selection(self, selection: TokenSelectConfig | None) -> HybridConfig:
        """A copy whose full layers decode with ``selection`` (``None``: dense)."""
        from dataclasses import replace

        fields = selection.to_fields() if selection else dict(decode="dense", select_k=None, select_init=None,
                                                              select_local=None, select_reuse=None,
                                                              select_reuse_max_age=None, select_reuse_against=None)
        return replace(self, **fields, format_version=2 if selection else 1)

    def sparse_prefill_config(self) -> SparsePrefillConfig | None:
        """The stored sparse prefill settings, or ``None`` (dense)."""
        return None if self.sparse_prefill is None else SparsePrefillConfig.from_dict(self.sparse_prefill)

    def head_routing_config(self) -> HeadRoutingConfig | None:
        """The stored head routing, or ``None`` (dense decoding)."""
        return None if self.head_routing is None else HeadRoutingConfig.from_dict(self.head_routing)

    def layer_kind(self, layer: int) -> str:
        """``streaming``, ``mixed`` or ``full`` (:meth:`HybridLayout.layer_kind`)."""
        return self.layout().layer_kind(layer)

    def kv_head_mask(self, layer: int) -> list[bool]:
        """``[num_kv_heads]`` booleans, True where that KV head of ``layer`` streams."""
        return list(self.layout().kv_head_mask(layer))

    @property
    def streaming_kv_heads(self) -> int:
        """How many (layer, KV head) pairs stream, model-wide."""
        return self.layout().streaming_kv_heads

    # ---- validation and (de)serialization --------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`LightTransferError` when the block is inconsistent."""
        if self.format_version not in READABLE_VERSIONS:
            raise LightTransferError(
                f"hybrid config format_version {self.format_version} is not supported (this lighttransfer "
                f"reads versions {', '.join(map(str, READABLE_VERSIONS))}); upgrade lighttransfer or reconvert the "
                "model."
            )
        if self.decode not in DECODE_POLICIES:
            raise LightTransferError(f"decode must be one of {', '.join(DECODE_POLICIES)}, got {self.decode!r}.")
        if self.decode == "tokenselect":
            if self.format_version < 2:
                raise LightTransferError("decode 'tokenselect' needs format_version 2.")
            missing = [f for f in _DECODE_FIELDS[1:] if getattr(self, f) is None]
            if missing:
                raise LightTransferError(f"decode 'tokenselect' needs {', '.join(missing)}.")
            self.selection  # noqa: B018 - the ranges, checked by TokenSelectConfig
        elif any(getattr(self, f) is not None for f in (*_DECODE_FIELDS[1:], *_OPTIONAL_DECODE_FIELDS)):
            raise LightTransferError("select_* fields are only meaningful with decode 'tokenselect'.")
        if self.granularity not in ("layer", "head"):
            raise LightTransferError(f"granularity must be 'layer' or 'head', got {self.granularity!r}.")
        self.layout()  # the layer-level rules: ranges, duplicates, mask lengths, sink and window

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["head_masks"] = {str(k): v for k, v in sorted(self.head_masks.items())}
        d["head_order"] = {str(k): v for k, v in sorted(self.head_order.items())}
        if not d["head_order"]:
            del d["head_order"]  # blocks written by convert stay as before
        if self.decode == "dense":
            for name in (*_DECODE_FIELDS, *_OPTIONAL_DECODE_FIELDS):  # a dense decode writes the format-1 block
                del d[name]
        for name, default in _OPTIONAL_DECODE_FIELDS.items():
            if d.get(name, default) in (None, default):
                d.pop(name, None)
        if d["sparse_prefill"] is None:
            del d["sparse_prefill"]  # likewise: absent means dense
        if d["head_routing"] is None:
            del d["head_routing"]
        return json.loads(json.dumps(d, sort_keys=True))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HybridConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise LightTransferError(f"unknown keys in the lighttransfer config block: {sorted(unknown)}.")
        try:
            return cls(**d)
        except TypeError as exc:
            raise LightTransferError(f"lighttransfer config block is incomplete: {exc}.") from exc

    @classmethod
    def from_model_config(cls, config: Any, *, origin: str | None = None) -> HybridConfig | None:
        """Read the block from a transformers config (object or dict); ``None`` when there is none.

        Raises:
            LightTransferError: the block is damaged; the message names ``config.json`` (``origin``: its path or
                model) and says to reconvert.
        """
        block = config.get(CONFIG_KEY) if isinstance(config, dict) else getattr(config, CONFIG_KEY, None)
        if block is None:
            return None
        where = f"'{origin}'" if origin else "config.json"
        if not isinstance(block, dict):
            raise LightTransferError(f"the '{CONFIG_KEY}' entry of {where} must be an object; it was edited or "
                                     "damaged: reconvert the model with `lighttransfer convert`.")
        try:
            return cls.from_dict(block)
        except LightTransferError as exc:
            raise LightTransferError(
                f"the '{CONFIG_KEY}' block of {where} is damaged: {str(exc).rstrip('.')}. Restore config.json or "
                "reconvert the model with `lighttransfer convert`."
            ) from exc

    def attach(self, config: Any) -> None:
        """Store the block on a transformers config object (it is then written by ``save_pretrained``)."""
        setattr(config, CONFIG_KEY, self.to_dict())


def _whole(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return value


__all__ = ["HybridConfig", "CONFIG_KEY", "FORMAT_VERSION", "READABLE_VERSIONS", "SIDECAR_NAME",
           "SIDECAR_FORMAT_VERSION"]
