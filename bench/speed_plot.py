"""Plot of a :class:`~lighttransfer.bench.speed.BenchResult`: decode throughput and KV memory per context."""

from __future__ import annotations

from pathlib import Path


def plot_bench(result, path: str | Path) -> bool:
    """Two panels: decode tokens/s at the largest batch, and KV bytes per sequence, against context length.

    Returns False when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    variants = list(dict.fromkeys(p["variant"] for p in result.points))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for variant in variants:
        big = sorted((p for p in result.points if p["variant"] == variant and p["largest_batch"]),
                     key=lambda p: p["context"])
        one = sorted((p for p in result.points if p["variant"] == variant and not p["largest_batch"]),
                     key=lambda p: p["context"])
        if big:
            ax1.plot([p["context"] for p in big], [p["decode_tokens_per_s"] for p in big], marker="o", label=variant)
            for p in big:
                ax1.annotate(f"b={p['batch']}", (p["context"], p["decode_tokens_per_s"]), fontsize=6,
                             textcoords="offset points", xytext=(3, 3))
        if one:
            ax2.plot([p["context"] for p in one], [p["kv_bytes"] / 2**30 for p in one], marker="o", label=variant)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(result.contexts, [f"{c // 1024}k" for c in result.contexts])
        ax.set_xlabel("context length (tokens)")
        if ax.get_legend_handles_labels()[0]:  # a run without a largest-batch point draws nothing here
            ax.legend(fontsize=7)
    ax1.set_yscale("log")
    ax1.set_ylabel("decode tokens/s at the largest batch (log)")
    ax2.set_ylabel("KV cache per sequence (GiB)")
    hw = result.environment.get("gpu") or result.environment.get("device")
    fig.suptitle(f"{result.model_id} on {hw}, sink {result.sink} + window {result.window}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return True


__all__ = ["plot_bench"]
