"""lighttransfer: turn a long-context causal LM into a hybrid of full and streaming attention layers.

Data flows one way: calibration text -> analysis report (JSON) -> convert -> checkpoint -> runtime.
The heavy public functions are imported lazily so that ``import lighttransfer`` and the CLI start fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import LightTransferError

__version__ = "0.1.0"

# public name -> "module:attribute", resolved on first use
_LAZY = {
    "load_model": "lighttransfer.loading:load_model",
    "analyze": "lighttransfer.analysis:analyze",
    "AnalysisReport": "lighttransfer.analysis.report:AnalysisReport",
    # not `convert`: that name is the subpackage lighttransfer.convert
    "convert_model": "lighttransfer.convert:convert",
    "HybridConfig": "lighttransfer.convert.hybrid_config:HybridConfig",
    "load": "lighttransfer.runtime:load",
}

__all__ = ["__version__", "LightTransferError", *_LAZY]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'lighttransfer' has no attribute {name!r}")
    module_name, attr = target.split(":")
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
