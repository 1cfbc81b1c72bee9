"""Model-shape facts every stage needs, read once from a transformers config (object or ``config.json`` dict).

Layers, query and KV heads, head_dim, positions, and the model's own sliding layers (Gemma 2/3, Cohere2,
gpt-oss, Qwen with ``use_sliding_window``: ``layer_types[i] == "sliding_attention"`` with one ``sliding_window``).
Multimodal wrappers keep the language model's shape under ``text_config``; :func:`text_config` finds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import LightTransferError


def _get(config: Any, name: str, default: Any = None) -> Any:
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


def text_config(config: Any) -> Any:
    """The part of ``config`` that describes the decoder: its ``text_config`` when it has one with layers (or
    ``get_text_config()`` for config objects), else ``config`` itself. Works on objects and dicts alike."""
    if not isinstance(config, dict) and hasattr(config, "get_text_config"):
        return config.get_text_config()
    inner = _get(config, "text_config")
    return inner if inner is not None and _get(inner, "num_hidden_layers") is not None else config


def native_sliding_layers(config: Any) -> list[int]:
    """Layers that already slide the model's own window (``layer_types[i] == "sliding_attention"``). Their cache
    is bounded by the architecture itself, so a conversion leaves them as they are."""
    text = text_config(config)
    return [i for i, kind in enumerate(_get(text, "layer_types") or []) if kind == "sliding_attention"]


def native_sliding_windows(config: Any) -> dict[int, int]:
    """``{layer: window}`` for :func:`native_sliding_layers` (empty when the config names no ``sliding_window``):
    what the cache, the KV tables and the evaluation rows bound those layers to."""
    window = _get(text_config(config), "sliding_window")
    return {i: int(window) for i in native_sliding_layers(config)} if window else {}


@dataclass(frozen=True)
class ModelShape:
    """The attention shape of a decoder.

    Attributes:
        num_layers: decoder layers.
        num_heads: query heads per layer.
        num_kv_heads: key/value heads per layer (``num_heads`` without GQA).
        head_dim: channels per head.
        max_positions: ``max_position_embeddings``, or ``None`` when the config does not say.
        model_type: the config's ``model_type``.
        native_windows: ``{layer: window}`` of the model's own sliding layers.
    """

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int | None = None
    model_type: str = ""
    native_windows: dict[int, int] = field(default_factory=dict)

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads


def model_shape(config: Any, *, source: str = "the model's config") -> ModelShape:
    """:class:`ModelShape` of a transformers config object or ``config.json`` dict.

    Raises:
        LightTransferError: the config names no layer count or head count (not a decoder we know how to read).
    """
    text = text_config(config)
    layers, heads = _get(text, "num_hidden_layers"), _get(text, "num_attention_heads")
    if not layers or not heads:
        raise LightTransferError(f"{source} names no num_hidden_layers / num_attention_heads; pass a decoder-only "
                                 "causal LM (Llama, Mistral, Qwen, Gemma, GPT-NeoX, ...).")
    kv_heads = _get(text, "num_key_value_heads") or heads
    head_dim = _get(text, "head_dim")
    if not head_dim:
        hidden = _get(text, "hidden_size")
        if not hidden:
            raise LightTransferError(f"{source} says neither head_dim nor hidden_size; cannot size its attention.")
        head_dim = hidden // heads
    max_pos = _get(text, "max_position_embeddings")
    return ModelShape(num_layers=int(layers), num_heads=int(heads), num_kv_heads=int(kv_heads),
                      head_dim=int(head_dim), max_positions=int(max_pos) if max_pos else None,
                      model_type=str(_get(text, "model_type") or _get(config, "model_type") or ""),
                      native_windows=native_sliding_windows(config))


__all__ = ["ModelShape", "model_shape", "text_config", "native_sliding_layers", "native_sliding_windows"]
