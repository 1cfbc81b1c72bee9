"""Write hybrid checkpoints (``convert``), read their layout (``inspect_checkpoint``), and the selection rules."""

from .converter import ConvertResult, convert, fingerprint_from_config
from .hybrid_config import CONFIG_KEY, FORMAT_VERSION, SIDECAR_NAME, HybridConfig
from .inspect_checkpoint import InspectResult, inspect_checkpoint
from .kv_memory import KVMemoryRow, kv_cache_bytes, kv_memory_table
from .native_swa import NATIVE_SWA_ARCHITECTURES, native_swa_fields
from .selection import (
    STRATEGIES,
    SelectionRow,
    explain_selection,
    select_kv_heads,
    select_layers,
    split_head_masks,
)

__all__ = [
    "convert",
    "ConvertResult",
    "fingerprint_from_config",
    "HybridConfig",
    "CONFIG_KEY",
    "FORMAT_VERSION",
    "SIDECAR_NAME",
    "inspect_checkpoint",
    "InspectResult",
    "KVMemoryRow",
    "kv_cache_bytes",
    "kv_memory_table",
    "native_swa_fields",
    "NATIVE_SWA_ARCHITECTURES",
    "select_layers",
    "select_kv_heads",
    "split_head_masks",
    "explain_selection",
    "SelectionRow",
    "STRATEGIES",
]
