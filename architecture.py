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


# architectures whose positions are learned embeddings: a token past the last one has no position at all (an
# index error deep in the model), where rotary models only degrade
ABSOLUTE_POSITION_TYPES = frozenset({"gpt2", "gpt_bigcode", "opt", "biogpt", "imagegpt", "openai-gpt", "ctrl", "xglm",
                                     "decision_transformer"})


def check_positions(config: Any, tokens: int, *, what: str, fix: str) -> str | None:
    """Refuse ``tokens`` beyond a model's positions when it has learned position embeddings; return a warning
    line (``None`` when within) for rotary models, which run but degrade there.

    Args:
        what: what holds the tokens (``"the prompt plus --max-new-tokens"``); fix: what to pass instead.
    """
    shape = model_shape(config)
    if not shape.max_positions or tokens <= shape.max_positions:
        return None
    line = (f"{what} ({tokens} tokens) is beyond the model's {shape.max_positions} positions")
    if shape.model_type in ABSOLUTE_POSITION_TYPES:
        raise LightTransferError(f"{line}; {shape.model_type} has no position past {shape.max_positions}. {fix}")
    return f"{line}; quality usually drops past them. {fix}"


def check_window_fits(config: Any, *, sink: int, window: int, option: str = "--window") -> None:
    """Refuse a sink + window that covers every position of the model: streaming would never drop a token, and
    the hybrid would silently be the dense model."""
    shape = model_shape(config)
    if shape.max_positions and sink + window >= shape.max_positions:
        raise LightTransferError(
            f"{option} {window} (plus {sink} sink tokens) covers all {shape.max_positions} positions of the model, "
            "so the streaming layers would never drop a token and the hybrid would be the dense model; pass "
            f"{option} {max(1, shape.max_positions // 4 - sink)} or another value below {shape.max_positions - sink}."
        )


__all__ = ["ABSOLUTE_POSITION_TYPES", "check_positions", "check_window_fits", "ModelShape", "model_shape", "text_config", "native_sliding_layers", "native_sliding_windows"]
