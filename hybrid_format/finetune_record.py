"""The fine-tune record of a hybrid checkpoint: how ``lighttransfer finetune`` changed its weights.

A merged checkpoint keeps its ``lighttransfer`` block exactly as ``convert`` wrote it (the layout did not change)
and stores the record beside it in ``config.json`` under its own key, ``"lighttransfer_finetune"``: a reader of the
block, of any lighttransfer version, reads a fine-tuned checkpoint as it reads any hybrid, and transformers keeps
the key through ``from_pretrained`` -> ``save_pretrained`` like the block. An adapter-only output writes the record
as ``lighttransfer_finetune.json`` beside the adapter::

    "lighttransfer_finetune": {
      "schema_version": 1,
      "output": "merged",                   # or "adapter"
      "steps": 200, "tokens": 1638400,      # optimizer steps, training tokens seen
      "final_loss": 2.91, "first_loss": 3.30,  # mean loss of the last / first steps (nats per token)
      "settings": {"lora_r": 8, "s2_attn": true, "seq_len": 8192, ...},
      "data": {"files": [...], "text_sha256": "...", "tokens_sha256": "...", "rows": 120, ...},
      "base": {"model_id": "...", "fingerprint": "..."},   # the hybrid that was fine-tuned
      "versions": {"lighttransfer": "0.1.0", "torch": "...", "transformers": "...", "peft": "..."},
      "previous": null                       # the base's own record, when it was fine-tuned before
    }
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import LightTransferError

FINETUNE_SCHEMA_VERSION = 1
FINETUNE_KEY = "lighttransfer_finetune"
FINETUNE_FILE = "lighttransfer_finetune.json"
OUTPUTS = ("merged", "adapter")


@dataclass
class FinetuneRecord:
    """What a fine-tune did (see the module docstring for the stored form)."""

    output: str
    steps: int
    tokens: int
    final_loss: float | None
    first_loss: float | None
    settings: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    base: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    previous: dict[str, Any] | None = None
    schema_version: int = FINETUNE_SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != FINETUNE_SCHEMA_VERSION:
            raise LightTransferError(f"finetune record schema_version {self.schema_version} is not supported (this "
                                     f"lighttransfer reads version {FINETUNE_SCHEMA_VERSION}); upgrade lighttransfer.")
        if self.output not in OUTPUTS:
            raise LightTransferError(f"finetune record: output must be one of {OUTPUTS}, got {self.output!r}.")
        for name in ("steps", "tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise LightTransferError(f"finetune record: {name} must be a whole number >= 0, got {value!r}.")
        for name in ("final_loss", "first_loss"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value)):
                raise LightTransferError(f"finetune record: {name} must be a finite number or null, got {value!r}.")
        for name in ("settings", "data", "base", "versions"):
            if not isinstance(getattr(self, name), dict):
                raise LightTransferError(f"finetune record: {name} must be an object.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> FinetuneRecord:
        if not isinstance(d, dict):
            raise LightTransferError("the finetune record must be an object.")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise LightTransferError(f"unknown keys in the finetune record: {sorted(unknown)}.")
        try:
            return cls(**d)
        except TypeError as exc:
            raise LightTransferError(f"the finetune record is incomplete: {exc}.") from exc

    @classmethod
    def from_model_config(cls, config: Any, *, origin: str | None = None) -> FinetuneRecord | None:
        """The record of a transformers config (object or dict), or ``None`` (never fine-tuned).

        Raises:
            LightTransferError: the record is damaged (the message names ``origin``).
        """
        raw = config.get(FINETUNE_KEY) if isinstance(config, dict) else getattr(config, FINETUNE_KEY, None)
        if raw is None:
            return None
        try:
            return cls.from_dict(raw)
        except LightTransferError as exc:
            where = f"'{origin}'" if origin else "config.json"
            raise LightTransferError(f"the '{FINETUNE_KEY}' record of {where} is damaged: {str(exc).rstrip('.')}.") \
                from exc

    def attach(self, config: Any) -> None:
        """Store the record on a transformers config object (``save_pretrained`` then writes it)."""
        setattr(config, FINETUNE_KEY, self.to_dict())


__all__ = ["FinetuneRecord", "FINETUNE_SCHEMA_VERSION", "FINETUNE_KEY", "FINETUNE_FILE"]
