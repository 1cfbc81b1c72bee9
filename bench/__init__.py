"""Benchmarks and evaluation: quality (``evaluate``: perplexity, passkey) and speed (``benchmark``), hybrid vs
original; the kernel benchmarks live beside them (``prefill_bench``, ``decode_bench``).

Heavy names are imported on first use, so that ``import lighttransfer.bench`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "evaluate": "lighttransfer.bench.eval_suite:evaluate",
    "EvalResult": "lighttransfer.bench.eval_suite:EvalResult",
    "EvalRow": "lighttransfer.bench.rows:EvalRow",
    "standard_rows": "lighttransfer.bench.rows:standard_rows",
    "masked_streaming": "lighttransfer.bench.masked_reference:masked_streaming",
    "benchmark": "lighttransfer.bench.speed:benchmark",
    "BenchResult": "lighttransfer.bench.speed:BenchResult",
    "build_shaped_model": "lighttransfer.bench.shaped_model:build_shaped_model",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'lighttransfer.bench' has no attribute {name!r}")
    module_name, attr = target.split(":")
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
