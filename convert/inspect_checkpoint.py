"""Read a hybrid checkpoint's layout and KV-cache budget from its ``config.json`` (no weights loaded)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..architecture import model_shape, native_sliding_windows, text_config
from ..errors import LightTransferError
from ..hybrid_format import (
    CONFIG_KEY,
    DEFAULT_TOKENS,
    DTYPE_BYTES,
    FinetuneRecord,
    HybridConfig,
    KVMemoryRow,
    kv_memory_table,
)


@dataclass
class InspectResult:
    """What ``lighttransfer inspect`` shows.

    Attributes:
        path: the checkpoint directory.
        hybrid: the ``lighttransfer`` block.
        model_type: the config's ``model_type``.
        head_dim: channels per attention head.
        dtype: the cache dtype the memory is sized for (the weights' dtype in the config unless given).
        memory: KV-cache bytes of the dense and the hybrid model at 8k/32k/128k tokens, batch 1.
        native_layer_types: the architecture's own ``layer_types`` when ``--native-swa`` wrote them.
        max_position_embeddings: the context length the config declares, when it says.
        finetune: the fine-tune record beside the block (``lighttransfer finetune``), or ``None``.
    """

    path: Path
    hybrid: HybridConfig
    model_type: str
    head_dim: int
    dtype: str
    memory: list[KVMemoryRow]
    native_layer_types: list[str] | None = None
    max_position_embeddings: int | None = None
    finetune: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "model_type": self.model_type, "head_dim": self.head_dim, "dtype": self.dtype,
            "hybrid": self.hybrid.to_dict(), "memory": [row.to_dict() for row in self.memory],
            "native_layer_types": self.native_layer_types,
            "max_position_embeddings": self.max_position_embeddings,
            **({"finetune": self.finetune} if self.finetune is not None else {}),
        }


def inspect_checkpoint(path: str | os.PathLike[str], *, tokens: tuple[int, ...] = DEFAULT_TOKENS,
                       dtype: str | None = None) -> InspectResult:
    """Read the hybrid layout of the checkpoint at ``path`` and size its KV cache.

    Args:
        path: a hybrid checkpoint directory (or its ``config.json``).
        tokens: sequence lengths to size the cache at (batch 1).
        dtype: the cache dtype (``float32``, ``bfloat16``, ``float16``); default: the weights' dtype in the config.

    Raises:
        LightTransferError: no readable config.json, or no ``lighttransfer`` block in it.
    """
    path = Path(path).expanduser()
    config_path = path if path.name == "config.json" else path / "config.json"
    if not config_path.is_file():
        raise LightTransferError(f"'{path}' has no config.json; pass a checkpoint directory written by convert.")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise LightTransferError(f"'{config_path}' is not valid JSON ({exc}).") from exc
    hybrid = HybridConfig.from_model_config(config, origin=str(config_path))
    if hybrid is None:
        raise LightTransferError(
            f"'{config_path.parent}' is a plain model, not a hybrid: its config.json has no '{CONFIG_KEY}' block. "
            "Make one with `lighttransfer convert`."
        )
    record = FinetuneRecord.from_model_config(config, origin=str(config_path))
    text = text_config(config)
    shape = model_shape(config, source=f"'{config_path}'")
    # the same consistency check the runtime (generate, eval) makes before it trusts the block
    if (shape.num_layers, shape.num_kv_heads) != (hybrid.num_layers, hybrid.num_kv_heads):
        raise LightTransferError(
            f"'{config_path}': its lighttransfer block describes {hybrid.num_layers} layers x {hybrid.num_kv_heads} "
            f"KV heads but the model has {shape.num_layers} x {shape.num_kv_heads}; the block was edited or belongs "
            "to another model. Reconvert the checkpoint with `lighttransfer convert`.")
    head_dim = shape.head_dim
    from ..architecture import check_window_fits

    check_window_fits(text, sink=hybrid.sink, window=hybrid.window, option="its window")  # as the runtime refuses
    dtype = str(dtype or text.get("dtype") or text.get("torch_dtype") or config.get("dtype") or "float32")
    dtype = dtype.removeprefix("torch.")
    if dtype not in DTYPE_BYTES:
        raise LightTransferError(f"cache dtype '{dtype}' is not known; use one of {', '.join(DTYPE_BYTES)}.")
    # the model's own sliding layers (with --native-swa the layer types are ours, and the streaming layers)
    native = {} if hybrid.native_swa else native_sliding_windows(text)
    memory = kv_memory_table(hybrid, head_dim=int(head_dim), dtype_bytes=DTYPE_BYTES[dtype], tokens=tokens,
                             native_windows=native)
    return InspectResult(
        path=config_path.parent,
        hybrid=hybrid,
        model_type=str(text.get("model_type") or config.get("model_type") or "?"),
        head_dim=int(head_dim),
        dtype=dtype,
        memory=memory,
        native_layer_types=text.get("layer_types") if hybrid.native_swa else None,
        max_position_embeddings=text.get("max_position_embeddings"),
        finetune=record.to_dict() if record is not None else None,
    )


__all__ = ["InspectResult", "inspect_checkpoint"]
