"""What vLLM serves of a hybrid checkpoint, read from its ``lighttransfer`` block alone.

The block (:class:`~lighttransfer.hybrid_format.HybridConfig`) is read from the transformers config vLLM
loaded. Whole streaming layers with a streaming prefill are served; anything else is refused with one line
that says what to do, never served as something it is not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ...errors import LightTransferError
from ...hybrid_format import CONFIG_KEY, HybridConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedLayout:
    """The streaming layers vLLM runs with sink + window attention.

    Attributes:
        streaming_layers: layer indices whose every KV head streams.
        sink, window: the rule (first ``sink`` tokens + the ``window`` most recent, the query's own included).
        native_swa: the config's ``layer_types`` / ``sliding_window`` were written by ``convert --native-swa``
            for these same layers, so the plugin ignores them.
    """

    streaming_layers: frozenset[int]
    sink: int
    window: int
    native_swa: bool = False


def served_layout(hf_config: Any, *, origin: str | None = None) -> ServedLayout | None:
    """The layout vLLM serves for a model's (text) config, ``None`` when it has no ``lighttransfer`` block.

    Raises:
        LightTransferError: the block is damaged, or describes a hybrid vLLM cannot serve yet (KV heads mixed
            within a layer; a full prefill; reordered heads).
    """
    block = HybridConfig.from_model_config(hf_config, origin=origin)
    if block is None:
        return None
    where = f"'{origin}'" if origin else "this checkpoint"
    layout = block.layout()
    if layout.mixed_masks:
        raise LightTransferError(
            f"{where} is a head-level hybrid ({len(layout.mixed_masks)} layers mix streaming and full KV heads), "
            "which lighttransfer's vLLM plugin cannot serve yet; serve it with lighttransfer.load, or convert a "
            "layer-level hybrid (convert --granularity layer).")
    if block.prefill != "streaming":
        raise LightTransferError(
            f"{where} asks for a full prefill (prefill: {block.prefill!r}), which vLLM's paged cache cannot trim "
            "afterwards; serve it with lighttransfer.load, or reconvert with --prefill streaming.")
    runtime_only = [name for name, on in (("TokenSelect decode", block.decode == "tokenselect"),
                                          ("sparse prefill", block.sparse_prefill is not None)) if on]
    if runtime_only:  # exact either way: the full layers then attend every key, as the original model does
        log.warning("%s asks for %s in its full layers, which the vLLM plugin does not run: vLLM serves those "
                    "layers with dense attention (the streaming layers as the block says); lighttransfer.load "
                    "runs them.", where, " and ".join(runtime_only))
    streaming = {i for i in range(layout.num_layers) if layout.layer_kind(i) == "streaming"}
    return ServedLayout(streaming_layers=frozenset(streaming), sink=block.sink, window=block.window,
                        native_swa=block.native_swa)


def has_block(hf_config: Any) -> bool:
    """Whether the config carries a ``lighttransfer`` block at all."""
    block = hf_config.get(CONFIG_KEY) if isinstance(hf_config, dict) else getattr(hf_config, CONFIG_KEY, None)
    return block is not None


__all__ = ["ServedLayout", "served_layout", "has_block"]
