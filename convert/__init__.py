"""Write hybrid checkpoints (``convert``), read their layout (``inspect_checkpoint``), and the selection rules.

The checkpoint format itself (the ``lighttransfer`` block, the KV-size formula) lives in
:mod:`lighttransfer.hybrid_format`, which every reader imports too.
"""

from .converter import ConvertResult, convert
from .inspect_checkpoint import InspectResult, inspect_checkpoint
from .native_swa import NATIVE_SWA_ARCHITECTURES, native_swa_fields
from .plan import pick_layers, share_of_all_layers
from .selection import (
    STRATEGIES,
    SelectionRow,
    explain_selection,
    select_full_kv_heads,
    select_kv_heads,
    select_layers,
    split_head_masks,
)

__all__ = [
    "convert",
    "ConvertResult",
    "inspect_checkpoint",
    "InspectResult",
    "native_swa_fields",
    "NATIVE_SWA_ARCHITECTURES",
    "select_layers",
    "select_kv_heads",
    "select_full_kv_heads",
    "split_head_masks",
    "pick_layers",
    "share_of_all_layers",
    "explain_selection",
    "SelectionRow",
    "STRATEGIES",
]
