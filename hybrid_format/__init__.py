"""The hybrid checkpoint format, shared by the writer (``convert``) and every reader (``runtime``, ``inspect``,
``eval``, ``bench``, a serving plugin): the versioned ``lighttransfer`` block of ``config.json``
(:class:`HybridConfig`), the layout it describes in memory (:class:`HybridLayout`) and the one KV-size formula
(:func:`kv_cache_bytes`). Plain Python, no torch."""

from .config_block import CONFIG_KEY, FORMAT_VERSION, SIDECAR_FORMAT_VERSION, SIDECAR_NAME, HybridConfig
from .finetune_record import FINETUNE_FILE, FINETUNE_KEY, FINETUNE_SCHEMA_VERSION, FinetuneRecord
from .head_routing import ROUTING_MODES, HeadRoutingConfig
from .kv_size import DEFAULT_TOKENS, DTYPE_BYTES, KVMemoryRow, format_bytes, kv_cache_bytes, kv_memory_table
from .layout import DEFAULT_SINK, DEFAULT_WINDOW, PREFILL_POLICIES, HybridLayout
from .sparse_prefill import SPARSE_METHODS, SparsePrefillConfig, sparse_prefill_config
from .token_select import DECODE_POLICIES, TokenSelectConfig, token_select_config

__all__ = [
    "HybridConfig",
    "CONFIG_KEY",
    "FORMAT_VERSION",
    "SIDECAR_NAME",
    "SIDECAR_FORMAT_VERSION",
    "HybridLayout",
    "FinetuneRecord",
    "FINETUNE_FILE",
    "FINETUNE_KEY",
    "FINETUNE_SCHEMA_VERSION",
    "TokenSelectConfig",
    "token_select_config",
    "sparse_prefill_config",
    "DECODE_POLICIES",
    "DEFAULT_SINK",
    "DEFAULT_WINDOW",
    "PREFILL_POLICIES",
    "kv_cache_bytes",
    "kv_memory_table",
    "KVMemoryRow",
    "format_bytes",
    "DTYPE_BYTES",
    "DEFAULT_TOKENS",
    "SparsePrefillConfig",
    "SPARSE_METHODS",
    "HeadRoutingConfig",
    "ROUTING_MODES",
]
