"""``lighttransfer analyze``: a thin click layer over :func:`lighttransfer.analysis.analyze`."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from ..calibration.passkey import HELD_OUT_TEMPLATES, TEMPLATES, TRAINING_TEMPLATES, check_templates
from ..errors import LightTransferError
from ..output_files import check_output_file
from .options import is_quiet, model_options, stderr_console, stdout_console, verbosity_options

BAR = "\u2588"


def _save_report(report, path: Path) -> None:
    """Save the report; when that fails (a full disk), save it to the temp folder so that the analysis is not
    lost, and say where."""
    import os
    import tempfile

    try:
        report.save(path)
    except LightTransferError as exc:
        spare = Path(tempfile.gettempdir()) / f"lighttransfer-report-{os.getpid()}.json"
        try:
            report.save(spare)
        except LightTransferError:
            raise LightTransferError(f"{str(exc).rstrip('.')}; the table above is the analysis, and it could not "
                                     "be saved anywhere else either.") from exc
        raise LightTransferError(f"{str(exc).rstrip('.')}; the analysis was saved to '{spare}' instead: move it "
                                 f"where you want it (mv '{spare}' '{path}').") from exc


def _table(report, lazy_fraction: float):
    from rich.markup import escape
    from rich.table import Table

    from ..analysis.heatmap import lazy_layers

    marked = set(lazy_layers(report, lazy_fraction))
    rank = {layer: i + 1 for i, layer in enumerate(report.ranking)}
    table = Table(title=f"lazy ratio per layer ({escape(str(report.model_id))})", title_style="bold")
    table.add_column("layer", justify="right")
    table.add_column("lazy ratio", justify="right")
    table.add_column("rank", justify="right")
    table.add_column("", no_wrap=True)
    native = set(report.params.get("native_sliding_layers") or [])
    for s in report.layers:
        width = round(s.lazy_ratio.mean * 30)
        style = "orange3" if s.layer in marked else "blue"
        bar = (f"[dim]own window of {report.params.get('native_sliding_window')} tokens[/dim]" if s.layer in native
               else f"[{style}]{BAR * width}[/{style}]")
        table.add_row(str(s.layer), f"{s.lazy_ratio.mean:.3f} \u00b1 {s.lazy_ratio.std:.3f}", str(rank[s.layer]), bar)
    return table


@click.command("analyze")
@click.argument("model", metavar="MODEL")
@click.argument("more_calib", nargs=-1, metavar="", required=False)
@click.option("--calib", multiple=True, metavar="FILE",
              help="Calibration text: .txt/.jsonl files, directories, globs, or synthetic:passkey; repeat the "
                   "option or list several files after it. Default: the shipped Sense and Sensibility excerpt.")
@click.option("--seq-len", default=None, type=int,
              help="Tokens per calibration sample [default: 4096, or the model's positions if fewer].")
@click.option("--samples", default=8, show_default=True, type=int, help="Number of calibration samples.")
@click.option("--batch", default=1, show_default=True, type=int, help="Samples per forward pass.")
@click.option("--sink", default=4, show_default=True, type=int, help="Initial tokens a streaming layer keeps.")
@click.option("--window", default=1020, show_default=True, type=int,
              help="Most recent tokens a streaming layer keeps (each query's own window, itself included).")
@click.option("--recent", "recent_alias", default=None, type=int, hidden=True,
              help="Old name of --window.")
@click.option("--last", default=32, show_default=True, type=int, help="Final queries of each sample measured.")
@click.option("--threshold", default=0.1, show_default=True, type=float,
              help="Long-context mass above which a query counts as reaching far back.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed that picks the calibration windows.")
@click.option("--field", default="text", show_default=True, help="JSONL field that holds the text.")
@click.option("--out", "out", default=None, metavar="REPORT.json", help="Write the report (JSON) here.")
@click.option("--plot", default=None, metavar="HEATMAP.png", help="Write a heatmap (layers x heads) here.")
@click.option("--lazy-fraction", default=0.5, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="Share of layers marked lazy in the table and the heatmap (display only).")
@click.option("--device-map", default=None, type=click.Choice(["auto"]),
              help="Spread a model too big for one GPU over all GPUs (accelerate).")
@click.option("--method", default="attention", show_default=True, type=click.Choice(["attention", "optimize"]),
              help="KV-head long-context score convert uses: attention mass, or gates optimized on "
                   "synthetic:passkey prompts (DuoAttention-style; slower, needs gradients).")
@click.option("--gate-steps", default=200, show_default=True, type=click.IntRange(min=1),
              help="With --method optimize: optimizer steps (one passkey prompt of --seq-len tokens each).")
@click.option("--gate-samples", default=None, type=click.IntRange(min=1),
              help="With --method optimize: distinct passkey prompts the gates train on [default: --samples]; "
                   "they are synthetic, so they need no more calibration text.")
@click.option("--gate-l1", default=0.01, show_default=True, type=click.FloatRange(min=0.0),
              help="With --method optimize: weight of the L1 penalty on the gates (higher = fewer full heads).")
@click.option("--gate-formats", default=",".join(TRAINING_TEMPLATES), show_default=True, metavar="NAMES",
              help="With --method optimize: passkey wordings to train on, used in turn (of "
                   f"{', '.join(TEMPLATES)}; {' and '.join(HELD_OUT_TEMPLATES)} are left out by default so "
                   "that 'eval --passkey-format' can test on a wording the gates never saw).")
@model_options
@verbosity_options
def analyze(model: str, more_calib: tuple[str, ...], calib: tuple[str, ...], seq_len: int, samples: int,
            batch: int, sink: int, window: int, recent_alias: int | None, last: int, threshold: float, seed: int, field: str,
            out: str | None, plot: str | None, lazy_fraction: float, device_map: str | None, method: str,
            gate_steps: int, gate_samples: int | None, gate_l1: float,
            gate_formats: str, device: str, dtype: str, trust_remote_code: bool) -> None:
    """Profile attention on calibration text: which layers are lazy (attend to sink + window tokens only).

    \b
    Example:
      lighttransfer analyze model/ --calib book.txt --seq-len 4096 --samples 8 --out report.json --plot heat.png
    """
    from ..analysis.heatmap import plot_heatmap
    from ..analysis.pipeline import analyze as run_analysis

    if more_calib and not calib:
        raise LightTransferError(
            f"unexpected argument(s) {' '.join(more_calib)}; calibration files go after --calib."
        )
    if recent_alias is not None:
        window = recent_alias
    formats = check_templates(gate_formats, option="--gate-formats")
    out_path = check_output_file(out, "--out", ".json")
    plot_path = check_output_file(plot, "--plot", ".png")
    quiet = is_quiet()
    sources = [*calib, *more_calib] or None

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("analysing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=stderr_console(), disable=quiet, transient=True)
    task = progress.add_task("samples", total=samples)
    gate_task = progress.add_task("gates", total=gate_steps, visible=method == "optimize")
    with progress:
        report = run_analysis(
            model, calib=sources, seq_len=seq_len, samples=samples, batch=batch, sink=sink, window=window,
            last=last, threshold=threshold, seed=seed, field=field, device=device, dtype=dtype,
            trust_remote_code=trust_remote_code, device_map=device_map,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
            method=method, gate_steps=gate_steps, gate_samples=gate_samples, gate_l1=gate_l1, gate_formats=formats,
            gate_progress=lambda done, total: progress.update(gate_task, completed=done, total=total),
        )
    console = stdout_console()
    console.print(_table(report, lazy_fraction))
    if out_path is not None:
        _save_report(report, out_path)
        console.print(f"report: {escape(str(out_path))}")
    if plot_path is not None:
        plot_heatmap(report, plot_path, lazy_fraction=lazy_fraction)
        console.print(f"heatmap: {escape(str(plot_path))}")
    if not quiet:
        t = report.timings
        console.print(f"[dim]{report.calibration.get('samples')} x {report.calibration.get('seq_len')} tokens "
                      f"in {t.get('analysis', 0):.1f} s; ranking (most lazy first): "
                      f"{' '.join(map(str, report.ranking))}[/dim]")


__all__ = ["analyze"]
