"""lighttransfer: turn a long-context causal LM into a hybrid of full and streaming attention layers.

Data flows one way: calibration text -> analysis report (JSON) -> convert -> checkpoint -> runtime.
The heavy public functions are imported lazily so that ``import lighttransfer`` and the CLI start fast.
"""

from __future__ import annotations

from .errors import LightTransferError
from .lazy_exports import lazy_exports

__version__ = "0.1.0"

# public name -> "module:attribute", resolved on first use
_LAZY = {
    "load_model": "lighttransfer.loading:load_model",
    "analyze": "lighttransfer.analysis:analyze",
    "AnalysisReport": "lighttransfer.analysis.report:AnalysisReport",
    # not `convert`: that name is the subpackage lighttransfer.convert
    "convert_model": "lighttransfer.convert:convert",
    "HybridConfig": "lighttransfer.hybrid_format.config_block:HybridConfig",
    "load": "lighttransfer.runtime:load",
    "generate_static": "lighttransfer.runtime:generate_static",
    "sparse_prefill_stats": "lighttransfer.runtime:sparse_prefill_stats",
    "head_routing_stats": "lighttransfer.runtime:head_routing_stats",
    "calibrate_head_routing": "lighttransfer.runtime:calibrate_head_routing",
}

__all__ = ["__version__", "LightTransferError", *_LAZY]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
