"""``lighttransfer sparse-mass``: a thin click layer over :func:`lighttransfer.analysis.sparse_mass.sparse_mass`."""

from __future__ import annotations

import click
from rich.markup import escape

from ..errors import LightTransferError
from ..output_files import check_output_file
from .convert import parse_layer_list
from .options import is_quiet, model_options, stdout_console, verbosity_options


def _floats(text: str, option: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LightTransferError(f"{option} '{text}': give comma-separated numbers, e.g. 0.9,0.95,0.98.") from None


def _table(report):
    from rich.table import Table

    table = Table(title=f"sparse prefill: mass kept vs density ({escape(report.model_id)}, "
                        f"{report.params['method']}, blocks {report.params['block_q']}x{report.params['block_k']}, "
                        f"{report.params['seq_len']} tokens)", title_justify="left")
    for name in ("layer", "alpha", "lists", "density", "mass kept", "worst head"):
        table.add_column(name, justify="right")
    for r in report.rows:
        table.add_row(str(r.layer), f"{r.alpha:g}", _lists(r.gqa_lists, r.lists_from), f"{r.density:.3f}",
                      f"{r.kept_mass:.4f}", f"{r.min_head_kept_mass:.4f}")
    for s in report.summary():
        table.add_row("[bold]all[/bold]", f"{s['alpha']:g}", _lists(s["gqa_lists"], s["lists_from"]),
                      f"[bold]{s['density']:.3f}[/bold]",
                      f"[bold]{s['kept_mass']:.4f}[/bold]", f"layer min {s['min_layer_kept_mass']:.4f}")
    return table


def _lists(layout: str, source: str) -> str:
    return layout if source == "estimate" else f"{layout}, exact"


@click.command("sparse-mass")
@click.argument("model", metavar="MODEL")
@click.option("--calib", multiple=True, metavar="FILE",
              help="Calibration text (.txt/.jsonl files, directories, globs) [default: the shipped text].")
@click.option("--seq-len", default=4096, show_default=True, type=click.IntRange(min=2), help="Tokens per sample.")
@click.option("--samples", default=2, show_default=True, type=click.IntRange(min=1), help="Calibration samples.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed that picks the calibration windows.")
@click.option("--method", default="sample", show_default=True, type=click.Choice(["sample", "vslash", "antidiag"]),
              help="Estimator whose lists are measured.")
@click.option("--alphas", default="0.9,0.95,0.98", show_default=True, help="Mass shares to measure, comma-separated.")
@click.option("--gqa-lists", default="query,kv-sum", show_default=True,
              help="List layouts to measure: query (per query head), kv-union, kv-sum (per KV head, packed kernel).")
@click.option("--block-q", default=128, show_default=True, type=int, help="Queries per block (per head).")
@click.option("--block-k", default=64, show_default=True, type=int, help="Keys per block.")
@click.option("--sink-blocks", default=1, show_default=True, type=click.IntRange(min=0), help="First key blocks kept.")
@click.option("--local-blocks", default=2, show_default=True, type=click.IntRange(min=1),
              help="Key blocks ending at the diagonal kept.")
@click.option("--layers", metavar="LIST", help="Layers to measure, e.g. 0-3,10 [default: all but the model's own "
              "sliding layers]; measure the full layers of a conversion to see their trade-off. The forward stops after the "
              "highest layer listed.")
@click.option("--oracle", is_flag=True, help="Also select from the exact block mass (rows 'LAYOUT, exact'): what a "
              "perfect estimator would visit, so the estimator's own cost in density or mass shows.")
@click.option("--out", default=None, metavar="REPORT.json", help="Write the report (JSON) here.")
@model_options
@verbosity_options
def sparse_mass(model, calib, seq_len, samples, seed, method, alphas, gqa_lists, block_q, block_k, sink_blocks,
                local_blocks, layers, oracle, out, device, dtype, trust_remote_code) -> None:
    """Measure, per layer on calibration text, the attention mass sparse prefill keeps at each alpha and density.

    \b
    Example:
      lighttransfer sparse-mass model/ --seq-len 8192 --alphas 0.9,0.95,0.98 --out sparse_mass.json
    """
    from pathlib import Path

    from ..analysis.sparse_mass import sparse_mass as run

    if out:
        check_output_file(Path(out), option="--out")
    report = run(model, calib=list(calib) or None, seq_len=seq_len, samples=samples, seed=seed, device=device,
                 dtype=dtype, trust_remote_code=trust_remote_code, method=method,
                 alphas=_floats(alphas, "--alphas"), gqa_lists=[g.strip() for g in gqa_lists.split(",") if g.strip()],
                 block_q=block_q, block_k=block_k, sink_blocks=sink_blocks, local_blocks=local_blocks,
                 layers=parse_layer_list(layers, option="--layers"), oracle=oracle)
    if out:
        report.save(out)
    console = stdout_console()
    if not is_quiet():
        console.print(_table(report))
    if out:
        console.print(f"wrote {escape(str(out))}")
