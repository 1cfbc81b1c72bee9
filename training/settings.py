"""The settings of a fine-tune, checked before anything is loaded, and recorded in the output and the resume state."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import LightTransferError
from .rope import check_rope_scaling

SETTINGS_SCHEMA_VERSION = 1
# settings a resumed run must share with the run that wrote the state (the rest may change, e.g. --steps)
RESUME_FIXED = ("seq_len", "batch", "lora_r", "lora_alpha", "lora_dropout", "train_norms", "train_embeddings",
                "s2_attn", "group_frac", "s2_sink", "seed", "rope_scaling", "rope_factor")


@dataclass(frozen=True)
class FinetuneSettings:
    """What ``lighttransfer finetune`` trains, and how.

    Attributes:
        seq_len: tokens per training row.
        steps: optimizer steps in all (a resumed run continues up to this number).
        batch: rows per step.
        lr: AdamW learning rate (LongLoRA: 2e-5), after ``warmup_steps`` of linear warmup; constant afterwards.
        warmup_steps: ``None``: ``min(20, steps // 10)`` (LongLoRA warms up for 20 steps).
        weight_decay: AdamW weight decay (LongLoRA: 0).
        max_grad_norm: gradients are clipped to this global norm (0: no clipping).
        lora_r, lora_alpha, lora_dropout: LoRA rank, scale numerator (scale = alpha / r) and dropout.
        train_norms, train_embeddings: also train every norm / the input embedding (and a tied output head).
        s2_attn: full layers train with S²-Attn (else dense causal); streaming layers always use sink + window.
        group_frac: S²-Attn group size as a share of ``seq_len`` (LongLoRA: 1/4).
        s2_sink: first tokens every S² head also sees (SinkLoRA-style; 0 = LongLoRA's S²-Attn).
        seed: seeds the LoRA initialization and the row order.
        gradient_checkpointing: recompute activations in the backward; ``None``: on CUDA, off on the CPU.
        attention: ``auto`` (FlexAttention on CUDA, explicit masks on the CPU), ``flex`` or ``dense``.
        rope_scaling, rope_factor: context extension (:mod:`.rope`): ``linear`` or ``yarn`` RoPE scaled by
            ``rope_factor`` (> 1), written into the output's config; ``None``: the model's own RoPE.
    """

    seq_len: int = 8192
    steps: int = 100
    batch: int = 1
    lr: float = 2e-5
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    train_norms: bool = False
    train_embeddings: bool = False
    s2_attn: bool = True
    group_frac: float = 0.25
    s2_sink: int = 0
    seed: int = 0
    gradient_checkpointing: bool | None = None
    attention: str = "auto"
    rope_scaling: str | None = None
    rope_factor: float | None = None
    schema_version: int = SETTINGS_SCHEMA_VERSION

    def __post_init__(self) -> None:
        def whole(name: str, low: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise LightTransferError(f"--{name.replace('_', '-')} must be a whole number >= {low}, got {value!r}.")

        whole("seq_len", 2)
        whole("steps", 1)
        whole("batch", 1)
        whole("lora_r", 1)
        whole("s2_sink", 0)
        if self.warmup_steps is not None:
            whole("warmup_steps", 0)
        if not self.lr > 0:
            raise LightTransferError(f"--lr must be positive, got {self.lr}.")
        if self.lora_alpha <= 0:
            raise LightTransferError(f"--lora-alpha must be positive, got {self.lora_alpha}.")
        if not 0.0 < self.group_frac <= 1.0:
            raise LightTransferError(f"--group-frac must be in (0, 1], got {self.group_frac}.")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise LightTransferError("--weight-decay and --max-grad-norm must be >= 0.")
        if self.attention not in ("auto", "flex", "dense"):
            raise LightTransferError(f"--attention must be auto, flex or dense, got {self.attention!r}.")
        check_rope_scaling(self.rope_scaling, self.rope_factor)
        if self.rope_factor is not None:
            object.__setattr__(self, "rope_factor", float(self.rope_factor))

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(20, self.steps // 10)

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based): linear warmup, then constant."""
        return self.lr * min(1.0, (step + 1) / self.warmup) if self.warmup else self.lr

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneSettings:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


__all__ = ["FinetuneSettings", "RESUME_FIXED", "SETTINGS_SCHEMA_VERSION"]
