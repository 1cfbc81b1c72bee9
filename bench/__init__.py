"""Speed benchmarks: the model step (``benchmark``: prefill latency, decode tokens/s, memory, hybrid vs original
in one process) and the kernels beside it (``prefill_bench``, ``decode_bench``). Quality lives in
:mod:`lighttransfer.evaluation`.

Heavy names are imported on first use, so that ``import lighttransfer.bench`` stays light.
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

_LAZY = {
    "benchmark": "lighttransfer.bench.speed:benchmark",
    "BenchResult": "lighttransfer.bench.speed:BenchResult",
    "build_shaped_model": "lighttransfer.bench.shaped_model:build_shaped_model",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
