"""Attention analysis: per-layer lazy ratios and per-head long-context scores (LightTransfer, Eq. 1).

Heavy names are imported on first use so that reading a report (``analysis.report``) does not import torch.
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

_LAZY = {
    "analyze": "lighttransfer.analysis.pipeline:analyze",
    "analyze_tokens": "lighttransfer.analysis.pipeline:analyze_tokens",
    "capture_lazy_mass": "lighttransfer.analysis.capture:capture_lazy_mass",
    "streaming_attention_mass": "lighttransfer.analysis.lazy_ratio:streaming_attention_mass",
    "head_statistics": "lighttransfer.analysis.lazy_ratio:head_statistics",
    "AnalysisReport": "lighttransfer.analysis.report:AnalysisReport",
    "plot_heatmap": "lighttransfer.analysis.heatmap:plot_heatmap",
    "optimize_head_gates": "lighttransfer.analysis.head_gates:optimize_head_gates",
    "HeadGateResult": "lighttransfer.analysis.head_gates:HeadGateResult",
    "gated_attention": "lighttransfer.analysis.head_gates_attention:gated_attention",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
