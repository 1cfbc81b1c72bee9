"""The ``README.md`` model card and its figure for a hybrid checkpoint."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from ..hybrid_format import HybridConfig, KVMemoryRow, format_bytes
from .selection import SelectionRow

log = logging.getLogger(__name__)

FIGURE_NAME = "lighttransfer_layers.png"


def plot_selection(
    path: Path,
    *,
    rows: Sequence[SelectionRow],
    hybrid: HybridConfig,
    kv_scores: Sequence[Sequence[float]] | None = None,
) -> bool:
    """Draw the selection: a layers x KV-heads heatmap of long-context scores for head-level hybrids, else a
    bar chart of per-layer lazy ratios (or, without scores, of which layers stream).

    Returns:
        True when a figure was written (matplotlib may be missing).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:  # pragma: no cover - matplotlib is a dependency, but the card must not need it
        log.warning("matplotlib is not installed; the model card has no figure")
        return False
    layers = [row.layer for row in rows]
    if hybrid.granularity == "head" and kv_scores is not None:
        import numpy as np

        grid = np.asarray(kv_scores, dtype=float).T  # [kv_heads, layers]
        fig, ax = plt.subplots(figsize=(max(5.0, 0.28 * len(layers) + 2), 1.2 + 0.35 * grid.shape[0]))
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        for layer in layers:
            for head, streams in enumerate(hybrid.kv_head_mask(layer)):
                if streams:
                    ax.text(layer, head, "S", ha="center", va="center", color="white", fontsize=7)
        ax.set_xlabel("layer")
        ax.set_ylabel("KV head")
        ax.set_title("long-context score per KV head (S = streams)")
        fig.colorbar(im, ax=ax, fraction=0.03)
    else:
        streaming_color, full_color = "#2a9d8f", "#8d99ae"
        have_scores = all(row.lazy_ratio is not None for row in rows)
        heights = [row.lazy_ratio if have_scores else 1.0 for row in rows]
        colors = [streaming_color if row.kind != "full" else full_color for row in rows]
        fig, ax = plt.subplots(figsize=(max(5.0, 0.25 * len(layers) + 2), 3.0))
        ax.bar(layers, heights, color=colors)
        ax.set_xlabel("layer")
        ax.set_ylabel("lazy ratio" if have_scores else "")
        ax.set_title(f"lazy ratio per layer (sink {hybrid.sink}, window {hybrid.window})" if have_scores
                     else "streaming layers")
        if have_scores:
            ax.set_ylim(0, 1)
        else:
            ax.set_yticks([])
        ax.legend(handles=[Patch(color=streaming_color, label="streaming"), Patch(color=full_color, label="full")],
                  loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fmt_ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def render_model_card(
    *,
    name: str,
    hybrid: HybridConfig,
    rows: Sequence[SelectionRow],
    memory: Sequence[KVMemoryRow],
    weights_note: str,
    figure: str | None,
    heatmap: str | None = None,
    hub_id: str | None = None,
    license_id: str | None = None,
    dtype_note: str | None = None,
) -> str:
    """Markdown of the model card: what streams and why, the cache it saves, and how to load it."""
    n_stream = sum(1 for row in rows if row.kind == "streaming")
    n_mixed = sum(1 for row in rows if row.kind == "mixed")
    source = hybrid.source
    front = ["---", "library_name: transformers", "tags:", "- lighttransfer", "- hybrid-attention",
             "- streaming-attention"]
    if hub_id:
        front.append(f"base_model: {hub_id}")
    if license_id:
        front.append(f"license: {license_id}")
    front.append("---")
    lines = [
        *front,
        "",
        f"# {name}: hybrid streaming-attention checkpoint",
        "",
        f"A hybrid of **{source.get('model_id', 'the source model')}** (fingerprint `{source.get('fingerprint', '?')}`) "
        "made with lighttransfer (LightTransfer, arXiv 2410.13846): its lazy layers keep only the first "
        f"**{hybrid.sink}** (sink) tokens and the last **{hybrid.window}** tokens (sliding window) in their KV cache; "
        "the other layers keep full attention.",
        "",
        f"- Streaming layers: **{n_stream} of {hybrid.num_layers}**"
        + (f" (+{n_mixed} layers with some streaming KV heads)" if n_mixed else "")
        + f"; granularity `{hybrid.granularity}`; prefill `{hybrid.prefill}`.",
        f"- Weights: {weights_note}.",
    ]
    if hybrid.selection is not None:
        lines.append(f"- Full layers decode with {hybrid.selection.describe()} (TokenSelect, arXiv 2411.02886; "
                     "`lighttransfer.load` applies it, stock loaders decode densely).")
    if dtype_note:
        lines.append(f"- {dtype_note}")
    if hybrid.calibration:
        params = ", ".join(f"{k}={v}" for k, v in sorted(hybrid.calibration.items()) if not isinstance(v, (dict, list)))
        lines.append(f"- Chosen from an attention analysis with {params}.")
    else:
        lines.append("- Layers chosen by hand (no analysis report).")
    if hybrid.native_swa:
        lines.append(
            "- `layer_types`/`sliding_window` are set too: stock transformers, vLLM and SGLang run the streaming "
            "layers as window-only attention **without sink tokens**, which loses accuracy."
        )
    lines += ["", "## KV-cache memory (batch 1)", "", "| tokens | original | hybrid | saved |", "|---:|---:|---:|---:|"]
    for row in memory:
        lines.append(f"| {row.tokens:,} | {format_bytes(row.dense_bytes)} | {format_bytes(row.hybrid_bytes)} "
                     f"| {100 * row.saved_fraction:.1f}% |")
    lines += ["", "## Layers", ""]
    if figure:
        lines += [f"![layer selection]({figure})", ""]
    if heatmap:
        lines += ["Lazy ratio per query head and per layer, from the analysis the layers were chosen with:", "",
                  f"![lazy-ratio heatmap]({heatmap})", ""]
    label = next((row.score_label for row in rows if row.score_label), None)
    score_head, score_rule = (f" {label} |", "---:|") if label else ("", "")
    lines += [f"| layer | attention | streaming KV heads | lazy ratio |{score_head} rank | why |",
              f"|---:|---|---:|---:|{score_rule}---:|---|"]
    for row in rows:
        score = f" {_fmt_ratio(row.score)} |" if label else ""
        lines.append(f"| {row.layer} | {row.kind} | {row.streaming_heads}/{hybrid.num_kv_heads} | "
                     f"{_fmt_ratio(row.lazy_ratio)} |{score} {row.rank or '—'} | {row.reason} |")
    lines += [
        "",
        "## Loading",
        "",
        "With lighttransfer (streaming layers use sink + window attention and a bounded cache):",
        "",
        "```python",
        "import lighttransfer",
        "",
        f'model = lighttransfer.load("{name}")',
        "```",
        "",
        "With plain transformers the checkpoint loads as the "
        + ("model with native sliding windows (no sinks):" if hybrid.native_swa else "original dense model:"),
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        "```",
        "",
        "`lighttransfer inspect` prints the layout and the cache budget. The hybrid layout is the "
        "`lighttransfer` block of `config.json`"
        + (f"; per-head scores are in `{hybrid.sidecar}`." if hybrid.sidecar else "."),
        "",
    ]
    return "\n".join(lines)


__all__ = ["render_model_card", "plot_selection", "FIGURE_NAME"]
