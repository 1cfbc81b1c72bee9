"""vLLM's own model classes, with sink + window attention in the streaming layers of a hybrid checkpoint.

Each class here is vLLM's class for the architecture; :class:`HybridModelMixin` runs vLLM's constructor, then
replaces the ``Attention`` of every streaming layer by a :class:`~.attention.SinkWindowAttention` with the
same heads, scale and cache settings (the weights, projections, rotary embedding and full layers stay
vLLM's). Without a ``lighttransfer`` block in the config the class is exactly vLLM's.

``convert --native-swa`` also writes ``layer_types`` / ``sliding_window`` for stock loaders; they describe
the same streaming layers without sinks, so the plugin turns them off before vLLM reads them (vLLM's Qwen
models would otherwise refuse the mixed layer types).
"""

from __future__ import annotations

import logging

from torch import nn

from .attention import SinkWindowAttention
from .grouping import vllm_grouping
from .internals import (
    Attention,
    VllmConfig,
    extract_layer_index,
    forget_attention_layer,
    vllm_model_classes,
)
from .layout import ServedLayout, served_layout
from .version import check_vllm_version

log = logging.getLogger(__name__)


def _text_config(vllm_config: VllmConfig):
    config = vllm_config.model_config.hf_config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _drop_native_swa_fields(config) -> None:
    """Undo what ``--native-swa`` wrote for stock loaders: the block, not these fields, governs."""
    config.layer_types = ["full_attention"] * int(config.num_hidden_layers)
    config.sliding_window = None
    if hasattr(config, "use_sliding_window"):
        config.use_sliding_window = False


def install_sink_window(model: nn.Module, layout: ServedLayout, vllm_config: VllmConfig) -> list[int]:
    """Replace the attention of ``layout``'s streaming layers in a built vLLM model; returns those layers.

    Raises:
        RuntimeError: a streaming layer of this pipeline stage has no vLLM ``Attention`` to replace.
    """
    replaced = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not Attention:
                continue
            layer = extract_layer_index(child.layer_name)
            if layer not in layout.streaming_layers:
                continue
            forget_attention_layer(vllm_config, child.layer_name)
            new = SinkWindowAttention(child.num_heads, child.head_size, child.impl.scale, sink=layout.sink,
                                      window=layout.window, num_kv_heads=child.num_kv_heads,
                                      cache_config=vllm_config.cache_config, quant_config=child.quant_config,
                                      prefix=child.layer_name)
            setattr(parent, name, new)
            replaced.append(layer)
    return sorted(replaced)


class HybridModelMixin:
    """Builds the parent vLLM model, then gives its streaming layers sink + window attention."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **kwargs) -> None:
        config = _text_config(vllm_config)
        layout = served_layout(config, origin=vllm_config.model_config.model)
        if layout is not None:
            check_vllm_version()
            if layout.native_swa:
                _drop_native_swa_fields(config)
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self.lighttransfer_layout = layout
        if layout is None:
            return
        replaced = install_sink_window(self, layout, vllm_config)
        log.info("lighttransfer: %d of %d layers run sink %d + window %d attention (layers %s)", len(replaced),
                 config.num_hidden_layers, layout.sink, layout.window, ",".join(map(str, replaced)) or "none")
        grouping = vllm_grouping(len(layout.streaming_layers), config.num_hidden_layers - len(layout.streaming_layers))
        if grouping is not None:
            (log.warning if grouping.full_padding else log.info)("lighttransfer: %s", grouping.describe())


_VLLM = vllm_model_classes()


class HybridLlamaForCausalLM(HybridModelMixin, _VLLM["LlamaForCausalLM"]):
    """vLLM's Llama with lighttransfer's streaming layers."""


class HybridMistralForCausalLM(HybridModelMixin, _VLLM["MistralForCausalLM"]):
    """vLLM's Mistral with lighttransfer's streaming layers."""


class HybridQwen2ForCausalLM(HybridModelMixin, _VLLM["Qwen2ForCausalLM"]):
    """vLLM's Qwen2 with lighttransfer's streaming layers."""


class HybridQwen3ForCausalLM(HybridModelMixin, _VLLM["Qwen3ForCausalLM"]):
    """vLLM's Qwen3 with lighttransfer's streaming layers."""


# the architecture names in config.json that these classes serve (the plugin registers them by these names)
MODEL_CLASSES = {
    "LlamaForCausalLM": HybridLlamaForCausalLM,
    "MistralForCausalLM": HybridMistralForCausalLM,
    "Qwen2ForCausalLM": HybridQwen2ForCausalLM,
    "Qwen3ForCausalLM": HybridQwen3ForCausalLM,
}

__all__ = ["HybridModelMixin", "install_sink_window", "MODEL_CLASSES", "HybridLlamaForCausalLM",
           "HybridMistralForCausalLM", "HybridQwen2ForCausalLM", "HybridQwen3ForCausalLM"]
