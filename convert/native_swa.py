"""Mark the streaming layers in an architecture's own config fields, for stock serving stacks.

Some transformers architectures describe per-layer attention with ``layer_types`` (``"sliding_attention"``
or ``"full_attention"``) plus one ``sliding_window``; transformers, vLLM and SGLang then keep a bounded cache
for the sliding layers. Their rule is window-only: a query at ``p`` sees keys in ``(p - sliding_window, p]``
(transformers' ``sliding_window_overlay``), the same window as ours but *without the sink tokens*, which
LightTransfer keeps because the first tokens soak up much of the attention mass (StreamingLLM, Sec. 3). So a
stock loader runs a close relative of the hybrid that loses accuracy; lighttransfer's runtime (and its vLLM
plugin, ``lighttransfer.serving.vllm``) reads our own block instead and keeps the sinks.

vLLM's own Qwen2/Qwen3 models (vLLM 0.32) pass no per-layer window to their attention and only check
``max_window_layers``: with mixed ``layer_types`` they refuse the model unless ``max_window_layers ==
num_hidden_layers``, and then they run *every* layer as full attention, silently (``max_window_layers``
defaults to 28, the layer count of Qwen2-7B). So for the Qwen family we also write ``max_window_layers`` as
the first streaming layer: transformers ignores it once ``layer_types`` is given, and stock vLLM refuses the
checkpoint loudly instead of serving it dense (when every layer streams, the types are uniform and vLLM
slides the window everywhere, as transformers does).
"""

from __future__ import annotations

from typing import Any

from ..errors import LightTransferError
from ..hybrid_format import HybridConfig

# model_type -> extra keys that switch the architecture's sliding window on. Each of these transformers
# modeling files reads ``config.layer_types[layer_idx]`` per layer (checked in the sources of transformers 5.17 and 5.24).
# the families whose vLLM models read only max_window_layers (see above)
MAX_WINDOW_LAYERS_TYPES = frozenset({"qwen2", "qwen3", "qwen2_moe"})
NATIVE_SWA_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "qwen2": {"use_sliding_window": True},
    "qwen3": {"use_sliding_window": True},
    "qwen2_moe": {"use_sliding_window": True},
    "ministral": {},
    "gemma2": {},
    "gemma3_text": {},
    "cohere2": {},
    "gpt_oss": {},
}
NATIVE_SWA_WARNING = (
    "--native-swa: stock transformers/vLLM/SGLang will run the marked layers as window-only attention "
    "without sink tokens, which loses accuracy (stock vLLM refuses Qwen models whose layers mix window and full "
    "attention); lighttransfer.load and the lighttransfer vLLM plugin keep the sinks."
)


def native_swa_fields(model_type: str, hybrid: HybridConfig, *, native_layers=()) -> dict[str, Any]:
    """The config keys that make a stock loader slide the window over the fully streaming layers.

    Args:
        model_type: the config's ``model_type``.
        hybrid: the hybrid layout; only ``streaming_layers`` can be expressed (per-head masks cannot, and those
            layers stay ``full_attention``).

    Returns:
        ``{"layer_types": [...], "sliding_window": window, ...}`` to merge into ``config.json``.

    Raises:
        LightTransferError: the architecture has no per-layer attention types in transformers, or the model already
            has sliding layers (``native_layers``) whose window one ``sliding_window`` field would overwrite.
    """
    extra = NATIVE_SWA_ARCHITECTURES.get(model_type)
    if extra is None:
        raise LightTransferError(
            f"--native-swa: transformers' '{model_type}' config has no per-layer attention types (layer_types), "
            f"so stock loaders cannot serve a hybrid of it; supported: {', '.join(NATIVE_SWA_ARCHITECTURES)}. "
            "Convert without --native-swa and run it with lighttransfer."
        )
    if native_layers:
        raise LightTransferError(
            f"--native-swa: the model already slides its own window on layers {_ranges(native_layers)}, and one "
            "sliding_window field cannot hold both windows; convert without --native-swa and run it with lighttransfer."
        )
    streaming = set(hybrid.streaming_layers)
    layer_types = [
        "sliding_attention" if i in streaming else "full_attention" for i in range(hybrid.num_layers)
    ]
    fields = {**extra, "layer_types": layer_types, "sliding_window": hybrid.window}
    if model_type in MAX_WINDOW_LAYERS_TYPES and streaming:
        fields["max_window_layers"] = min(streaming)
    return fields


def _ranges(layers) -> str:
    return ",".join(map(str, sorted(layers)))


__all__ = ["native_swa_fields", "NATIVE_SWA_ARCHITECTURES", "NATIVE_SWA_WARNING", "MAX_WINDOW_LAYERS_TYPES"]
