"""Markdown tables and plots of an :class:`~lighttransfer.evaluation.eval_suite.EvalResult`."""

from __future__ import annotations

from pathlib import Path


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _with_ci(pk: dict) -> str:
    if not pk:
        return "-"
    ci = pk.get("ci95")
    return f"{_pct(pk['accuracy'])} (n={pk['n']}" + (f"; {100 * ci[0]:.0f}-{100 * ci[1]:.0f}%)" if ci else ")")


def _versus(pk: dict, original: dict) -> str:
    """Paired difference to the original on the same prompts, in points."""
    from .stats import paired_difference

    a, b = pk.get("outcomes"), original.get("outcomes")
    if not a or not b or len(a) != len(b):
        return "-"
    diff, low, high = paired_difference(a, b)
    return f"{100 * diff:+.0f} ({100 * low:+.0f} to {100 * high:+.0f})"


def markdown_report(result) -> str:
    """Perplexity, passkey accuracy and KV budget per row, as markdown tables."""
    lines = [
        f"# Evaluation: {result.model_id}",
        "",
        f"Ratio {result.ratio:.2f} of layers streaming (sink {result.sink}, window {result.window}); "
        f"text: {result.text}; backend: {result.backend}; "
        f"{result.environment.get('device')}, torch {result.environment.get('torch')}, "
        f"transformers {result.environment.get('transformers')}.",
        "",
        ("Perplexity is scored only on tokens after at least "
         + ", ".join(f"{int(L) - s} (at {L})" for L, s in result.strides.items())
         + " tokens of context, i.e. beyond sink + window. " if result.strides else "")
        + "KV is the cache kept after L tokens as a share of the "
        "original's, sink and window included (with a full prefill, the peak during prefill is 100%). "
        "Retrieval intervals: Wilson 95% for a row's accuracy; for the difference to the original, a paired normal "
        "interval over the same prompts.",
        "",
    ]
    formats = list(getattr(result, "passkey_formats", None) or [getattr(result, "passkey_format", "passkey")])
    extra = formats[1:] if result.passkey_lengths else []
    if result.passkey_lengths and (formats[0] != "passkey" or extra):
        lines += [f"Retrieval prompts: the '{formats[0]}' wording (calibration.passkey.TEMPLATES)"
                  + (f"; the last columns: {', '.join(repr(f) for f in extra)}, with the same keys, depths and filler."
                     if extra else "."), ""]
    header = ["row", "layers streaming", *[f"ppl @{L}" for L in result.lengths]]
    header += [f"{formats[0]} @{L}" for L in result.passkey_lengths]  # columns named by the wording
    original = next((r.get("passkey", {}) for r in result.rows if r["name"] == "original"), {})
    paired = bool(result.passkey_lengths and original.get("outcomes"))
    if result.passkey_lengths:
        header.append(f"{formats[0]} all (95% CI)")
    if paired:
        header.append("vs original, points (95% CI)")
    header += [f"{fmt} all" for fmt in extra]
    kv_lengths = sorted({*result.lengths, *result.passkey_lengths, *getattr(result, "ruler_lengths", [])})
    header += [f"KV @{L}" for L in kv_lengths]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result.rows:
        if row.get("online_ratio") is not None:
            layers = f"{round(row['online_ratio'] * row['num_layers'])} (per input)"
        elif row.get("head_masks"):
            heads = len(row["streaming_layers"]) * row["num_kv_heads"] + sum(
                sum(m) for m in row["head_masks"].values())
            layers = (f"{len(row['streaming_layers'])} + {len(row['head_masks'])} mixed "
                      f"({heads}/{row['num_layers'] * row['num_kv_heads']} KV heads)")
        else:
            layers = str(len(row["streaming_layers"]))
        streams = row["streaming_layers"] or row.get("head_masks") or row.get("online_ratio") is not None
        cells = [f"{row['name']} ({row.get('prefill', 'streaming')} prefill)" if streams else row["name"], layers]
        cells += [f"{row['perplexity'][str(L)]['ppl']:.3f}" for L in result.lengths]
        if result.passkey_lengths:
            pk = row.get("passkey", {})
            cells += [_pct(pk["by_length"][str(L)]) if str(L) in pk.get("by_length", {}) else "-"
                      for L in result.passkey_lengths]
            cells.append(_with_ci(pk))
            if paired:
                cells.append(_versus(pk, original))
            by_format = row.get("passkey_by_format", {})
            cells += [f"{_pct(by_format[f]['accuracy'])} (n={by_format[f]['n']})" if f in by_format else "-"
                      for f in extra]
        cells += [f"{100 * row['kv_fraction'][str(L)]:.1f}%" for L in kv_lengths]
        lines.append("| " + " | ".join(cells) + " |")
    if getattr(result, "ruler_lengths", None):
        lines += ["", *_ruler_section(result)]
    lines += ["", "Layers per row:", ""]
    for row in result.rows:
        if row["name"] == "original":
            continue
        what = "chosen per input" if row.get("online_ratio") is not None else str(row["streaming_layers"])
        if row.get("head_masks"):
            what += " fully, and KV heads " + ", ".join(
                f"{layer}:{[i for i, s in enumerate(m) if s]}" for layer, m in sorted(row["head_masks"].items(),
                                                                                 key=lambda kv: int(kv[0])))
        lines.append(f"- {row['name']}: {what} ({row.get('note', '')})")
        cache = row.get("selection_cache")
        if cache and cache.get("lookups"):
            lines.append(f"  - Selection Cache: {cache['hits']} of {cache['lookups']} selections reused "
                         f"({100 * cache['hit_rate']:.1f}%); {cache['dense']} queries attended densely (budget "
                         "covered every key)")
        routed = row.get("head_routing_realised")
        if routed and routed.get("decisions"):
            calib = row.get("routing_calibration")
            how = ""
            if calib and calib.get("on", "text") == "text":
                how = f"; tau calibrated per layer for {calib['share']:g} on {calib['samples']} x {calib['tokens']} " \
                      "tokens of the text"
            elif calib:
                kinds = ", ".join(f"{n} {kind}" for kind, n in calib["kinds"].items())
                how = f"; tau calibrated per layer for {calib['share']:g} on held-out samples ({kinds})"
            lines.append(f"  - Head routing: {100 * routed['local_share']:.1f}% of {routed['decisions']} (query, "
                         f"KV head) decisions routed local{how}")
            parts = row.get("head_routing_realised_by_part") or {}
            if len(parts) > 1:
                lines.append("  - by part: " + ", ".join(f"{part} {100 * p['local_share']:.1f}% of {p['decisions']}"
                                                         for part, p in parts.items()))
    if result.passkey_lengths:
        lines += ["", "Passkey accuracy by depth (rows: depth of the key, 0 = start of the text):", ""]
        for row in result.rows:
            grid = row["passkey"]["grid"]
            lens = list(grid)
            depths = list(next(iter(grid.values())))
            lines += [f"**{row['name']}**", "", "| depth | " + " | ".join(lens) + " |",
                      "|---|" + "---|" * len(lens)]
            for d in depths:
                lines.append(f"| {float(d):.2f} | " + " | ".join(_pct(grid[L][d]) for L in lens) + " |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _ruler_section(result) -> list[str]:
    """RULER-style scores: rows x tasks (mean over lengths), the average, and the paired difference to the
    original; then each row's task x length grid."""
    from .ruler import task_order
    from .stats import paired_difference

    rows = [r for r in result.rows if "ruler" in r]
    tasks = task_order(t for r in rows for t in r["ruler"]["by_task"])
    original = next((r["ruler"] for r in rows if r["name"] == "original"), None)
    lines = [f"RULER-style tasks (ours, generated from {result.text}; {result.ruler_samples} samples per task and "
             f"length at {', '.join(map(str, result.ruler_lengths))} tokens; RULER's string_match_all / _part, %):",
             "", "| row | " + " | ".join(tasks) + " | average |" + (" vs original, points (95% CI) |" if original else ""),
             "|---" * (len(tasks) + 2 + bool(original)) + "|"]
    for row in rows:
        r = row["ruler"]
        cells = [f"{r['by_task'][t]:.1f}" if t in r["by_task"] else "-" for t in tasks]
        line = f"| {row['name']} | " + " | ".join(cells) + f" | {r['average']:.1f} |"
        if original:
            a, b = r.get("outcomes") or [], original.get("outcomes") or []
            if a and len(a) == len(b):
                diff, low, high = paired_difference([x / 100 for x in a], [x / 100 for x in b])
                line += f" {100 * diff:+.1f} ({100 * low:+.1f} to {100 * high:+.1f}) |"
            else:
                line += " - |"
        lines.append(line)
    lines += ["", "By length (rows: task; columns: tokens):", ""]
    for row in rows:
        grid = row["ruler"]["by_task_length"]
        lens = [str(L) for L in result.ruler_lengths]
        lines += [f"**{row['name']}**", "", "| task | " + " | ".join(lens) + " |", "|---|" + "---|" * len(lens)]
        lines += [f"| {t} | " + " | ".join(f"{grid[t][L]:.0f}" if L in grid.get(t, {}) else "-" for L in lens) + " |"
                  for t in tasks]
        lines.append("")
    return lines


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional on machines without matplotlib
        return None
    return plt


def _heatmap_panels(result, path: Path, rows: list[dict], draw, *, title: str, panel_size: tuple[float, float],
                    ylabel: str) -> bool:
    """One heatmap panel per row, four to a line; ``draw(ax, row, first_column)`` fills a panel. Returns False
    without matplotlib or rows."""
    plt = _plt()
    if plt is None or not rows:
        return False
    cols = min(4, len(rows))
    nrows = (len(rows) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(max(6.0, panel_size[0] * cols), panel_size[1] * nrows),
                             squeeze=False)
    for i, (ax, row) in enumerate(zip(axes.flat, rows, strict=False)):
        draw(ax, row, i % cols == 0)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(f"{title}, {result.model_id}, ratio {result.ratio:.2f}, S={result.sink} W={result.window}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return True


def plot_passkey(result, path: Path) -> bool:
    """One heatmap per row: passkey accuracy by depth (y) and length (x). Returns False without matplotlib."""
    def draw(ax, row, first_column):
        grid = row["passkey"]["grid"]
        lens = list(grid)
        depths = list(next(iter(grid.values())))
        ax.imshow([[grid[L][d] for L in lens] for d in depths], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lens)), lens)
        ax.set_yticks(range(len(depths)), [f"{float(d):.0%}" for d in depths], fontsize=7)
        ax.set_title(f"{row['name']} ({_pct(row['passkey']['accuracy'])})", fontsize=9)
        ax.set_xlabel("context length")

    rows = [r for r in result.rows if "passkey" in r]
    return _heatmap_panels(result, path, rows, draw, title="Passkey retrieval", panel_size=(3.2, 3.0),
                           ylabel="needle depth")


def plot_ruler(result, path: Path) -> bool:
    """One task x length heatmap per row (scores 0-100). Returns False without matplotlib."""
    from .ruler import draw_scores, task_order

    rows = [r for r in result.rows if "ruler" in r]
    tasks = task_order(t for r in rows for t in r["ruler"]["by_task_length"])
    lens = [str(L) for L in result.ruler_lengths]

    def draw(ax, row, first_column):
        draw_scores(ax, row["ruler"]["by_task_length"], tasks, lens, task_labels=first_column)
        ax.set_title(f"{row['name']} ({row['ruler']['average']:.1f})", fontsize=9)
        ax.set_xlabel("tokens")

    return _heatmap_panels(result, path, rows, draw, title="RULER-style tasks",
                           panel_size=(1.5 + 0.8 * len(lens), 1.0 + 0.35 * len(tasks)), ylabel="")


def plot_perplexity(result, path: Path) -> bool:
    """Perplexity against context length, one line per row. Returns False without matplotlib."""
    plt = _plt()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in result.rows:
        ys = [row["perplexity"][str(L)]["ppl"] for L in result.lengths]
        ax.plot(result.lengths, ys, marker="o", label=row["name"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(result.lengths, [str(L) for L in result.lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity (tokens beyond sink + window)")
    ax.set_title(f"{result.model_id}, ratio {result.ratio:.2f}, S={result.sink} W={result.window}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return True


__all__ = ["markdown_report", "plot_passkey", "plot_perplexity", "plot_ruler"]
