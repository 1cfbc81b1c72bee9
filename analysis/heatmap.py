"""A PNG heatmap of a report: lazy ratio per (layer, query head), and per layer with the lazy layers marked."""

from __future__ import annotations

import os
from pathlib import Path

from ..output_files import atomic_path
from .report import AnalysisReport


def lazy_layers(report: AnalysisReport, fraction: float) -> list[int]:
    """The ``round(fraction * num_layers)`` laziest layers (those a conversion at that ratio would stream)."""
    count = round(fraction * report.num_layers)
    return sorted(report.ranking[:count])


def plot_heatmap(report: AnalysisReport, path: str | os.PathLike[str], *, lazy_fraction: float = 0.5,
                 title: str | None = None) -> Path:
    """Write ``path`` (PNG): left, query heads x layers coloured by lazy ratio; right, each layer's lazy
    ratio with its spread over samples, the ``lazy_fraction`` laziest layers in orange. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    heads = np.array(report.head_lazy_ratios())  # [layers, heads]
    means = np.array(report.layer_lazy_ratios())
    stds = np.array([s.lazy_ratio.std for s in report.layers])
    marked = set(lazy_layers(report, lazy_fraction))
    layers = report.num_layers
    height = max(4.0, 0.24 * layers + 1.6)
    fig, (ax_heads, ax_layers) = plt.subplots(
        1, 2, figsize=(4.0 + 0.35 * report.num_heads + 4.0, height), sharey=True,
        gridspec_kw={"width_ratios": [max(report.num_heads, 3), 6]},
    )
    image = ax_heads.imshow(heads, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax_heads.set_xlabel("query head")
    ax_heads.set_ylabel("layer")
    ax_heads.set_xticks(range(report.num_heads))
    ax_heads.set_yticks(range(layers))
    ax_heads.set_yticklabels([f"{i} \u25c6" if i in marked else str(i) for i in range(layers)], fontsize=7)
    for label, i in zip(ax_heads.get_yticklabels(), range(layers), strict=True):
        if i in marked:
            label.set_color("tab:orange")
            label.set_fontweight("bold")
    group = report.num_heads // report.num_kv_heads
    for boundary in range(group, report.num_heads, group):  # GQA groups
        ax_heads.axvline(boundary - 0.5, color="white", linewidth=1.2)
    fig.colorbar(image, ax=ax_heads, fraction=0.05, pad=0.02, label="lazy ratio (sink + window mass)")

    colors = ["tab:orange" if i in marked else "tab:blue" for i in range(layers)]
    ax_layers.barh(range(layers), means, xerr=stds, color=colors, height=0.8, error_kw={"linewidth": 0.8})
    ax_layers.set_xlim(0.0, 1.0)
    ax_layers.set_xlabel("layer lazy ratio (mean \u00b1 std over samples)")
    ax_layers.grid(axis="x", alpha=0.3)
    p = report.params
    ax_layers.set_title(f"\u25c6 orange: {len(marked)} laziest layers ({lazy_fraction:.0%})", fontsize=9)
    fig.suptitle(title or f"{report.model_id}: sink {p.get('sink')}, window {p.get('window')}, last "
                 f"{p.get('last')} queries, {p.get('samples')} x {p.get('seq_len')} tokens", fontsize=10)
    fig.tight_layout()

    path = Path(path)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=130, format="png")
    finally:
        plt.close(fig)
    return path


__all__ = ["plot_heatmap", "lazy_layers"]
