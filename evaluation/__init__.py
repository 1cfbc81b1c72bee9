"""Quality evaluation (``lighttransfer eval``): perplexity and retrieval of a hybrid against the original and
baseline selections, every row on the same samples.

Heavy names are imported on first use, so that ``import lighttransfer.evaluation`` stays light.
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

# public name -> "module:attribute", resolved on first use
_MODULES = {
    "eval_suite": ("evaluate", "EvalResult"),
    "rows": ("EvalRow", "standard_rows"),
    "masked_reference": ("masked_streaming",),
}
_LAZY = {name: f"lighttransfer.evaluation.{module}:{name}" for module, names in _MODULES.items() for name in names}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
