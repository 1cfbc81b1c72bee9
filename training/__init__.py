"""Recovery fine-tuning of a hybrid checkpoint (``lighttransfer finetune``), after convert and beside the runtime.

LoRA (peft) on the attention projections, optionally trainable norms and embeddings; the streaming layers train
with their own sink + window attention, the full layers with LongLoRA's S²-Attn whose shift never wraps around
(:mod:`.masks`); the output is a merged hybrid checkpoint with a ``finetune`` record, or a peft adapter.
peft is optional (``pip install 'lighttransfer[finetune]'``): the masks and data need only torch.
"""

from .attention import TrainingAttention, training_attention
from .data import TrainingData, load_training_data
from .finetune import FinetuneResult, FinetuneStart, StepReport, check_finetune_inputs, finetune
from .masks import HeadRule, LayerRules, dense_mask, flex_block_mask, head_visible, layer_rules, s2_group_size
from .rope import RopeExtension, extend_rope
from .settings import FinetuneSettings

__all__ = [
    "finetune",
    "check_finetune_inputs",
    "FinetuneSettings",
    "RopeExtension",
    "extend_rope",
    "FinetuneResult",
    "FinetuneStart",
    "StepReport",
    "TrainingAttention",
    "training_attention",
    "TrainingData",
    "load_training_data",
    "HeadRule",
    "LayerRules",
    "layer_rules",
    "head_visible",
    "dense_mask",
    "flex_block_mask",
    "s2_group_size",
]
