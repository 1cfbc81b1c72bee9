"""LoRA on the attention projections (peft), optionally trainable norms and embeddings ("LoRA+", LongLoRA Sec. 3.3).

LongLoRA found plain LoRA too weak for long-context adaptation and closed the gap by also training the embedding
and normalization layers, a small share of the parameters (Llama-2 7B: under 2% embeddings, 0.004% norms). On a
small model the embedding is not small: SmolLM2-135M's 49,152 x 576 embedding is 28.3M of its 134.5M parameters
(21%). With **tied embeddings** (SmolLM2, most small models) the output head *is* that matrix, so
``--train-embeddings`` trains the input embedding and the output projection together: the trainable share is
21%, not twice that, and the merged checkpoint stays tied (peft's ``ensure_weight_tying``); the optimizer state
for it (AdamW: two fp32 copies) is then the bulk of the training memory.

peft is an optional dependency (``pip install 'lighttransfer[finetune]'``); :func:`require_peft` says so in one
line when it is missing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import LightTransferError

log = logging.getLogger(__name__)

EMBEDDING_NAMES = ("embed_tokens", "embed_in", "wte", "word_embeddings")


def require_peft():
    """The ``peft`` module, or a one-line error saying how to install it."""
    try:
        import peft
    except ImportError as exc:
        raise LightTransferError("fine-tuning needs peft: pip install 'lighttransfer[finetune]' (or pip install "
                                 "peft).") from exc
    return peft


def attention_projections(model) -> list[str]:
    """The names (last component) of the linear layers directly inside the attention modules: ``q_proj, k_proj,
    v_proj, o_proj`` on Llama-style models, ``query_key_value, dense`` on GPT-NeoX."""
    from .attention import attention_modules

    names: dict[str, None] = {}
    for module in attention_modules(model):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.Linear):
                names[name] = None
    if not names:
        raise LightTransferError(f"found no attention projections in {type(model).__name__}; this architecture "
                                 "cannot be fine-tuned with LoRA here.")
    return list(names)


def norm_modules(model) -> list[str]:
    """Names (last component) of the normalization layers: every RMSNorm / LayerNorm module."""
    names: dict[str, None] = {}
    for name, module in model.named_modules():
        kind = type(module).__name__
        if name and (isinstance(module, torch.nn.LayerNorm) or kind.endswith("RMSNorm") or kind.endswith("LayerNorm")):
            names[name.rsplit(".", 1)[-1]] = None
    return list(names)


def embedding_module(model) -> str:
    """The input embedding's name (last component)."""
    emb = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is emb:
            return name.rsplit(".", 1)[-1]
    raise LightTransferError(f"cannot find the input embedding of {type(model).__name__}.")


def ties_embeddings(model) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


@dataclass(frozen=True)
class TrainableShare:
    """Trainable parameters against the model's own (every tensor counted once, tied ones too)."""

    trainable: int
    total: int
    tied_embeddings: bool

    @property
    def fraction(self) -> float:
        return self.trainable / max(self.total, 1)

    def describe(self) -> str:
        tied = "; embeddings tied to the output head (one matrix)" if self.tied_embeddings else ""
        return f"{self.trainable:,} trainable of {self.total:,} parameters ({100 * self.fraction:.2f}%){tied}"


def add_lora(model, *, r: int, alpha: int, dropout: float = 0.0, train_norms: bool = False,
             train_embeddings: bool = False, seed: int = 0):
    """Wrap ``model`` in a peft ``PeftModel``: LoRA (rank ``r``, scale ``alpha / r``) on the attention projections,
    and full training of the norms and/or the input embedding (peft ``modules_to_save``, tied output head kept
    tied). LoRA's B starts at zero, so the wrapped model computes exactly what ``model`` did.

    Trainable tensors are kept in float32 (the frozen weights may be bf16; the forward runs under autocast)."""
    peft = require_peft()
    if r < 1:
        raise LightTransferError(f"--lora-r must be at least 1, got {r}.")
    if alpha <= 0:
        raise LightTransferError(f"--lora-alpha must be positive, got {alpha}.")
    if not 0.0 <= dropout < 1.0:
        raise LightTransferError(f"--lora-dropout must be in [0, 1), got {dropout}.")
    save = []
    if train_norms:
        save += norm_modules(model)
    tied = ties_embeddings(model)
    if train_embeddings:
        save.append(embedding_module(model))
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                             target_modules=attention_projections(model), modules_to_save=save or None,
                             ensure_weight_tying=bool(train_embeddings and tied))
    torch.manual_seed(seed)
    wrapped = peft.get_peft_model(model, config, autocast_adapter_dtype=True)
    for p in wrapped.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return wrapped


def trainable_share(model) -> TrainableShare:
    """Count trainable and total parameters of a (peft) model, each tensor once. peft's ``modules_to_save``
    keeps a frozen original beside each trained copy: the originals are not counted."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    trainable = total = 0
    for name, p in base.named_parameters():  # named_parameters() yields a shared tensor once
        if "original_module" in name:
            continue
        if p.requires_grad:
            trainable += p.numel()
        if ".lora_" not in name:
            total += p.numel()
    return TrainableShare(trainable=trainable, total=total, tied_embeddings=ties_embeddings(base))


__all__ = ["add_lora", "trainable_share", "TrainableShare", "attention_projections", "norm_modules",
           "embedding_module", "ties_embeddings", "require_peft"]
