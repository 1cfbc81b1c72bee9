"""The ``lighttransfer`` block of a hybrid checkpoint's ``config.json``.

This block is the contract between ``convert`` (which writes it) and ``runtime`` (which reads it). It is
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
      "calibration": {"sink": 4, "recent": 1020, "last": 32, ...},  # what the layers were chosen with
      "report_summary": {...},                 # small: lazy ratios per layer, ranking
      "sidecar": "lighttransfer_scores.json",  # bulky per-head scores beside the weights, or null
      "native_swa": false                      # true when layer_types/sliding_window were also written
    }
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..errors import LightTransferError

CONFIG_KEY = "lighttransfer"
FORMAT_VERSION = 1
SIDECAR_NAME = "lighttransfer_scores.json"
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
        calibration: analysis parameters the selection was made with (sink, recent, last, seq_len, ...).
        report_summary: small summary of the analysis (per-layer lazy ratios, ranking).
        sidecar: file name of the bulky per-head scores beside the weights, or ``None``.
        native_swa: the architecture's own ``layer_types`` + ``sliding_window`` fields were also written, so
            stock loaders slide a window (without sinks) over ``streaming_layers``.
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
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.streaming_layers = sorted(int(i) for i in self.streaming_layers)
        self.head_masks = {int(k): [bool(x) for x in v] for k, v in self.head_masks.items()}
        self.validate()

    # ---- queries -------------------------------------------------------------------------------------
    def layer_kind(self, layer: int) -> Literal["full", "streaming", "mixed"]:
        """``streaming`` when every KV head of ``layer`` streams, ``mixed`` when some do, else ``full``."""
        if layer in self.streaming_layers:
            return "streaming"
        mask = self.head_masks.get(layer)
        if mask is None or not any(mask):
            return "full"
        return "streaming" if all(mask) else "mixed"

    def kv_head_mask(self, layer: int) -> list[bool]:
        """``[num_kv_heads]`` booleans, True where that KV head of ``layer`` streams."""
        if layer in self.streaming_layers:
            return [True] * self.num_kv_heads
        return list(self.head_masks.get(layer, [False] * self.num_kv_heads))

    @property
    def streaming_kv_heads(self) -> int:
        """How many (layer, KV head) pairs stream, model-wide."""
        return sum(sum(self.kv_head_mask(i)) for i in range(self.num_layers))

    def kv_fraction(self, seq_len: int) -> float:
        """KV-cache entries kept at ``seq_len`` tokens, as a fraction of the dense model's (sink + window
        included); the same for every batch size and dtype."""
        if seq_len <= 0:
            return 1.0
        kept = min(seq_len, self.sink + self.window)
        total = self.num_layers * self.num_kv_heads
        streaming = self.streaming_kv_heads
        return ((total - streaming) * seq_len + streaming * kept) / (total * seq_len)

    # ---- validation and (de)serialization --------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`LightTransferError` when the block is inconsistent."""
        if self.format_version != FORMAT_VERSION:
            raise LightTransferError(
                f"hybrid config format_version {self.format_version} is not supported (this lighttransfer "
                f"reads version {FORMAT_VERSION}); upgrade lighttransfer or reconvert the model."
            )
        if self.window < 1:
            raise LightTransferError(f"window must be at least 1 token, got {self.window}.")
        if self.sink < 0:
            raise LightTransferError(f"sink must be 0 or more tokens, got {self.sink}.")
        if self.prefill not in ("streaming", "full"):
            raise LightTransferError(f"prefill policy must be 'streaming' or 'full', got {self.prefill!r}.")
        if self.granularity not in ("layer", "head"):
            raise LightTransferError(f"granularity must be 'layer' or 'head', got {self.granularity!r}.")
        bad = [i for i in [*self.streaming_layers, *self.head_masks] if not 0 <= i < self.num_layers]
        if bad:
            raise LightTransferError(
                f"layer indices {bad} are out of range for a model with {self.num_layers} layers (0..{self.num_layers - 1})."
            )
        if len(set(self.streaming_layers)) != len(self.streaming_layers):
            raise LightTransferError(f"streaming_layers has duplicates: {self.streaming_layers}.")
        for layer, mask in self.head_masks.items():
            if len(mask) != self.num_kv_heads:
                raise LightTransferError(
                    f"head mask of layer {layer} has {len(mask)} entries; the model has {self.num_kv_heads} KV heads."
                )
            if layer in self.streaming_layers:
                raise LightTransferError(f"layer {layer} is both fully streaming and head-masked; pick one.")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["head_masks"] = {str(k): v for k, v in sorted(self.head_masks.items())}
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
    def from_model_config(cls, config: Any) -> HybridConfig | None:
        """Read the block from a transformers config (object or dict); ``None`` when there is none."""
        block = config.get(CONFIG_KEY) if isinstance(config, dict) else getattr(config, CONFIG_KEY, None)
        if block is None:
            return None
        if not isinstance(block, dict):
            raise LightTransferError(f"config.json's '{CONFIG_KEY}' entry must be an object.")
        return cls.from_dict(block)

    def attach(self, config: Any) -> None:
        """Store the block on a transformers config object (it is then written by ``save_pretrained``)."""
        setattr(config, CONFIG_KEY, self.to_dict())


__all__ = ["HybridConfig", "CONFIG_KEY", "FORMAT_VERSION", "SIDECAR_NAME"]
