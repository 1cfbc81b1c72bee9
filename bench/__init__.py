"""Benchmarks and evaluation: quality (``evaluate``: perplexity, passkey) and speed (``benchmark``), hybrid vs
original; the kernel benchmarks live beside them (``prefill_bench``, ``decode_bench``).

Heavy names are imported on first use, so that ``import lighttransfer.bench`` stays light.
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

_LAZY = {
    "evaluate": "lighttransfer.bench.eval_suite:evaluate",
    "EvalResult": "lighttransfer.bench.eval_suite:EvalResult",
    "EvalRow": "lighttransfer.bench.rows:EvalRow",
    "standard_rows": "lighttransfer.bench.rows:standard_rows",
    "masked_streaming": "lighttransfer.bench.masked_reference:masked_streaming",
    "benchmark": "lighttransfer.bench.speed:benchmark",
    "BenchResult": "lighttransfer.bench.speed:BenchResult",
    "build_shaped_model": "lighttransfer.bench.shaped_model:build_shaped_model",
    "wilson_interval": "lighttransfer.bench.stats:wilson_interval",
    "paired_difference": "lighttransfer.bench.stats:paired_difference",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
