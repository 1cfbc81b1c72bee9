"""``lighttransfer eval``: a thin click layer over :func:`lighttransfer.evaluation.evaluate`."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
from rich.markup import escape

from ..calibration.passkey import HELD_OUT_TEMPLATES, TEMPLATES, TRAINING_TEMPLATES
from ..errors import LightTransferError
from ..evaluation.rows import ROW_KINDS
from ..hybrid_format import HeadRoutingConfig
from .options import (
    is_quiet,
    model_options,
    stderr_console,
    stdout_console,
    token_select_options,
    verbosity_options,
)


def int_list(value: str, option: str) -> list[int]:
    """``"1k,2048,4K"`` -> ``[1024, 2048, 4096]`` (a ``k`` suffix means 1024)."""
    out = []
    for part in (p.strip().lower() for p in value.split(",")):
        if not part:
            continue
        scale = 1024 if part.endswith("k") else 1
        try:
            number = int(part[:-1] if part.endswith("k") else part) * scale
        except ValueError:
            raise LightTransferError(
                f"{option} '{value}' is not a comma-separated list of token counts (e.g. 2048,4096 or 4k,16k)."
            ) from None
        if number < 2:
            raise LightTransferError(f"{option}: every length must be at least 2 tokens, got {part}.")
        out.append(number)
    return out


def float_list(value: str, option: str) -> list[float]:
    try:
        return [float(p) for p in value.split(",") if p.strip()]
    except ValueError:
        raise LightTransferError(f"{option} '{value}' is not a comma-separated list of numbers (e.g. 0.25,0.5).") from None


def _sparse_config(method: str, alpha: float, min_len: int, blocks: str):
    from ..hybrid_format import SparsePrefillConfig

    sizes = int_list(blocks, "--sparse-blocks")
    if len(sizes) != 2:
        raise LightTransferError(f"--sparse-blocks takes two sizes BQ,BK, got {blocks!r}.")
    return SparsePrefillConfig(method=method, alpha=alpha, min_len=min_len, block_q=sizes[0], block_k=sizes[1])


def _line_range(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    try:
        a, b = (int(x) for x in value.split(":"))
    except ValueError:
        raise LightTransferError(f"--text-lines '{value}' must be FIRST:LAST (1-based line numbers).") from None
    if not 1 <= a <= b:
        raise LightTransferError(f"--text-lines '{value}' must satisfy 1 <= FIRST <= LAST.")
    return a, b


class _Bar:
    """Progress fed by :func:`evaluate`: a rich bar on a terminal, else (logs, nohup) a plain line every
    ``every`` seconds, so a long CPU run is never silent until its end."""

    def __init__(self, every: float = 30.0) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        console = stderr_console()
        self.plain = not console.is_terminal
        self.every = every
        self.progress = None if self.plain else Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=True)
        self.task = None
        self.total = self.done = 0
        self.started = self.last = time.monotonic()

    def __enter__(self):
        if self.progress is not None:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def start(self, total: int) -> None:
        self.total = total
        if self.progress is not None:
            self.task = self.progress.add_task("evaluating", total=total)

    def step(self, description: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress.update(self.task, advance=1, description=description)
            return
        now = time.monotonic()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            print(f"eval: {self.done}/{self.total} ({description}), {now - self.started:.0f} s", file=sys.stderr,
                  flush=True)


@click.command("eval")
@click.argument("hybrid", required=False, metavar="[HYBRID_DIR]")
@click.option("--baseline", required=True, metavar="MODEL",
              help="The original model (directory, .gguf or hub id); its weights serve every row.")
@click.option("--text", "text", required=True, metavar="FILE",
              help="Long real text to evaluate on (not the calibration text).")
@click.option("--text-lines", default=None, metavar="FIRST:LAST", help="Use only these lines of --text (1-based).")
@click.option("--report", default=None, metavar="REPORT.json",
              help="Analysis report: lazy ratios for the least-lazy row and for choosing layers without a hybrid; "
                   "KV-head attention mass for head-level, KV-head gates (analyze --method optimize) for "
                   "head-level-gates.")
@click.option("--lengths", default="2048,4096,8192", show_default=True,
              help="Context lengths for perplexity, comma-separated (k = 1024).")
@click.option("--stride", type=int, default=None,
              help="Scored tokens per perplexity window [default: a quarter of the length].")
@click.option("--windows", "max_windows", type=int, default=2, show_default=True,
              help="Perplexity windows per length.")
@click.option("--passkey-lengths", default="2048,4096", show_default=True,
              help="Passkey prompt lengths, comma-separated; empty for no passkey test.")
@click.option("--passkey-depths", type=int, default=10, show_default=True, help="Needle depths per length.")
@click.option("--passkey-trials", type=int, default=2, show_default=True, help="Samples per (length, depth).")
@click.option("--passkey-format", default="passkey", show_default=True, metavar="NAMES",
              help=f"Retrieval prompt wording(s), comma-separated, of {', '.join(TEMPLATES)}; each gets the same "
                   "keys, depths and filler, the first fills the main columns and the plots. The gate optimization "
                   f"trains on {', '.join(TRAINING_TEMPLATES)} by default; {' and '.join(HELD_OUT_TEMPLATES)} "
                   "stay out of training (held-out formats).")
@click.option("--suite", default="perplexity,passkey", show_default=True, metavar="PARTS",
              help="What to measure, comma-separated, of perplexity, passkey and ruler (RULER-style tasks generated "
                   "from --text and fitted to the tokenizer at every --lengths).")
@click.option("--ruler-tasks", default=None, metavar="NAMES",
              help="With --suite ruler: the tasks, comma-separated [default: all: niah_single_1..3, niah_multikey_1..3, "
                   "niah_multivalue, niah_multiquery, vt, cwe, fwe, qa_haystack].")
@click.option("--samples", "ruler_samples", type=int, default=25, show_default=True,
              help="With --suite ruler: samples per task and length.")
@click.option("--ruler-batch", type=int, default=1, show_default=True,
              help="With --suite ruler: samples generated together (left-padded); above 1 needs --backend runtime.")
@click.option("--rows", default=",".join(("original", "lighttransfer", "random", "least-lazy", "streamingllm",
                                          "prefill-full", "online")), show_default=True,
              help="Rows to compare, comma-separated. " + "; ".join(f"{k}: {v}" for k, v in ROW_KINDS.items())
              + ". All but original and streamingllm stream the same share of the KV cache (--ratio).")
@click.option("--ratio", type=float, default=None,
              help="Share of layers streaming in every row [default: the hybrid's, else 0.5].")
@click.option("--sink", type=int, default=None, help="Sink tokens [default: the hybrid's, else 4].")
@click.option("--window", type=int, default=None, help="Window tokens [default: the hybrid's, else 1020].")
@click.option("--backend", type=click.Choice(["masked", "runtime"]), default="masked", show_default=True,
              help="masked: the dense model with a streaming mask (exact, any model); runtime: the bounded-cache "
                   "runtime.")
@token_select_options("tokenselect rows", "the hybrid's, else ")
@click.option("--select-page", type=int, default=None,
              help="quest rows (the Quest-like page-bound baseline): keys per page [default: 16, at most "
                   "--select-k].")
@click.option("--sparse-prefill", "sparse_method", type=click.Choice(["sample", "vslash", "antidiag"]),
              default="sample", show_default=True,
              help="Estimator of the sparse-prefill rows: sampled query rows, last-queries vertical-slash or "
                   "antidiagonal scoring.")
@click.option("--sparse-alpha", type=float, default=0.95, show_default=True,
              help="Sparse-prefill rows: share of the estimated attention mass each (head, query block) keeps.")
@click.option("--sparse-min-len", type=int, default=16384, show_default=True,
              help="Sparse-prefill rows: keys below which a prefill stays dense (scale it down with the lengths).")
@click.option("--sparse-blocks", default="128,64", show_default=True, metavar="BQ,BK",
              help="Sparse-prefill rows: query rows and keys per block (powers of two >= 16).")
@click.option("--routing-share", type=float, default=0.5, show_default=True,
              help="qada rows: the share of (query, KV head) decisions routed local they are compared at.")
@click.option("--routing-tau", type=float, default=None,
              help="qada and qada-oracle rows: a fixed far-share threshold instead of one calibrated per layer for "
                   "--routing-share.")
@click.option("--routing-stats", type=click.Choice(["bulk", "local"]), default="bulk", show_default=True,
              help="qada row: the Gaussian's moments from the bulk keys or from the window keys.")
@click.option("--routing-cov", type=click.Choice(["full", "diag"]), default="full", show_default=True,
              help="qada row: full or diagonal covariance of the keys.")
@click.option("--routing-guard", type=click.Choice(["none", "pages"]), default="none", show_default=True,
              help="qada row: needle guard (the qada-pages row always has the pages guard).")
@click.option("--routing-page", type=int, default=None,
              help="qada-pages row (and qada with --routing-guard pages): keys per page of the guard [default: 64].")
@click.option("--routing-window", type=int, default=None,
              help="qada rows: the window of a routed-local head [default: --window].")
@click.option("--routing-calibrate-on", type=click.Choice(["prompts", "text"]), default="prompts",
              show_default=True,
              help="qada rows: calibrate the thresholds on held-out samples of every evaluated kind (text, passkey "
                   "and RULER prompts, with their answers) or on stretches of the text only.")
@click.option("--routing-calibration", type=int, default=12, show_default=True, metavar="N",
              help="qada rows: calibration samples per evaluated kind.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random row and passkeys.")
@click.option("--out", default="eval_results.json", show_default=True, metavar="PATH",
              help="Results JSON (markdown and plots are written beside it), or a directory. While the run goes, "
                   "the finished rows are kept in NAME.partial.json beside it (eval-merge reads it), removed at "
                   "the end.")
@model_options
@verbosity_options
def evaluate(hybrid, baseline, text, text_lines, report, lengths, stride, max_windows, passkey_lengths,
             passkey_depths, passkey_trials, passkey_format, suite, ruler_tasks, ruler_samples, ruler_batch, rows, ratio, sink, window, backend,
             select_k, select_init, select_local, select_reuse, select_reuse_max_age, select_reuse_against, select_page,
             sparse_method, sparse_alpha, sparse_min_len,
             sparse_blocks, routing_share, routing_tau, routing_stats, routing_cov, routing_guard, routing_page,
             routing_window, routing_calibrate_on, routing_calibration, seed, out, device,
             dtype, trust_remote_code):
    """Perplexity, passkey retrieval and RULER-style tasks of a hybrid against the original and baselines.

    \b
    Example:
      lighttransfer eval hybrid/ --baseline model/ --text book.txt --suite ruler --lengths 4k,8k --samples 25
    """
    from ..evaluation.eval_report import markdown_report
    from ..evaluation.eval_suite import evaluate as run_eval
    from ..evaluation.eval_suite import output_paths, write_outputs
    from ..output_files import check_output_target, write_json
    from . import keep_on_interrupt

    check_output_target(out, "--out")  # before hours of work, not after

    if max_windows < 1:
        raise LightTransferError(f"--windows must be at least 1, got {max_windows}.")
    if passkey_trials < 1:
        raise LightTransferError(f"--passkey-trials must be at least 1, got {passkey_trials}.")
    kwargs = dict(
        baseline=baseline, text=text, text_lines=_line_range(text_lines), hybrid=hybrid, report=report,
        lengths=int_list(lengths, "--lengths"), stride=stride, max_windows=max_windows,
        passkey_lengths=int_list(passkey_lengths, "--passkey-lengths"), passkey_depths_count=passkey_depths,
        passkey_trials=passkey_trials, passkey_format=passkey_format, rows=[r.strip() for r in rows.split(",") if r.strip()], ratio=ratio,
        sink=sink, window=window, backend=backend, seed=seed, device=device, dtype=dtype, out=None,
        suite=suite, ruler_tasks=ruler_tasks, ruler_samples=ruler_samples, ruler_batch=ruler_batch, select_k=select_k,
        select_init=select_init, select_local=select_local, select_reuse=select_reuse,
        select_reuse_max_age=select_reuse_max_age, select_reuse_against=select_reuse_against, select_page=select_page,
        sparse_prefill=_sparse_config(sparse_method, sparse_alpha, sparse_min_len, sparse_blocks),
        head_routing=HeadRoutingConfig(mode="qada", tau=0.0, stats=routing_stats, cov=routing_cov,
                                       window=routing_window, guard=routing_guard,
                                       page=routing_page if routing_guard == "pages" else None),
        routing_share=routing_share, routing_tau=routing_tau, routing_page=routing_page,
        routing_calibrate_on=routing_calibrate_on, routing_calibration=routing_calibration,
    )
    paths = output_paths(out)
    partial = partial_path(paths["json"])

    def keep(so_far) -> None:  # a run cut short keeps its finished rows
        write_json(partial, so_far.to_dict())
        keep_on_interrupt("eval", f"the finished rows are in {partial} (eval-merge reads it)")

    kwargs["on_row"] = keep
    if is_quiet():
        result = run_eval(**kwargs)
    else:
        with _Bar() as bar:
            result = run_eval(progress=bar, **kwargs)
    console = stdout_console()
    if not is_quiet():
        console.print(markdown_report(result).split("\n\nLayers per row")[0], soft_wrap=True, markup=False)
    write_outputs(result, out)  # after the results are on the screen: a failed write loses nothing
    partial.unlink(missing_ok=True)
    keep_on_interrupt("eval", None)
    console.print(f"wrote {escape(str(paths['json']))} and {escape(str(paths['md']))}")


def partial_path(json_path: Path) -> Path:
    """Where ``eval`` keeps the rows finished so far: ``NAME.partial.json`` beside ``NAME.json``."""
    return json_path.with_name(f"{json_path.stem}.partial.json")


__all__ = ["evaluate", "int_list", "float_list"]


@click.command("eval-merge")
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, metavar="PATH",
              help="Merged results JSON (markdown and plots are written beside it), or a directory.")
@verbosity_options
def eval_merge(results, out):
    """Join results of one evaluation whose rows ran apart (e.g. `--rows` split over several GPUs).

    \b
    Example:
      lighttransfer eval ... --rows original --out a.json   # on one GPU
      lighttransfer eval ... --rows lighttransfer,random --out b.json   # on another
      lighttransfer eval-merge a.json b.json --out eval.json
    """
    from ..evaluation.eval_merge import merge_files
    from ..evaluation.eval_suite import write_outputs
    from ..output_files import check_output_target

    check_output_target(out, "--out")
    merged = merge_files(results)
    paths = write_outputs(merged, out)
    stderr_console().print(f"merged {len(merged.rows)} rows of {len(results)} results: "
                           + ", ".join(escape(str(p)) for p in paths.values()))
