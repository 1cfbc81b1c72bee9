"""Quality evaluation (``lighttransfer eval``): perplexity and retrieval of a hybrid against the original and
baseline selections, every row on the same samples.

Heavy names are imported on first use, so that ``import lighttransfer.evaluation`` stays light.
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

_LAZY = {
    "evaluate": "lighttransfer.evaluation.eval_suite:evaluate",
    "EvalResult": "lighttransfer.evaluation.eval_suite:EvalResult",
    "EvalRow": "lighttransfer.evaluation.rows:EvalRow",
    "standard_rows": "lighttransfer.evaluation.rows:standard_rows",
    "masked_streaming": "lighttransfer.evaluation.masked_reference:masked_streaming",
    "wilson_interval": "lighttransfer.evaluation.stats:wilson_interval",
    "paired_difference": "lighttransfer.evaluation.stats:paired_difference",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
