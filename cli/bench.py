"""``lighttransfer bench``: a thin click layer over :func:`lighttransfer.bench.benchmark`."""

from __future__ import annotations

import click
from rich.markup import escape

from ..errors import LightTransferError
from .evaluate import float_list, int_list
from .options import (
    is_quiet,
    model_options,
    stderr_console,
    stdout_console,
    token_select_options,
    verbosity_options,
)


@click.command("bench")
@click.argument("hybrid", required=False, metavar="[HYBRID_DIR]")
@click.option("--baseline", required=True, metavar="MODEL",
              help="The original model (directory, .gguf, hub id) or 'llama3-8b-shaped' (random bf16 weights).")
@click.option("--report", default=None, metavar="REPORT.json", help="Analysis report whose ranking picks the layers.")
@click.option("--context", "contexts", default="4k,16k,32k", show_default=True,
              help="Context lengths, comma-separated (k = 1024).")
@click.option("--ratios", default="0.25,0.5,0.75", show_default=True, help="Streaming ratios to sweep.")
@click.option("--memory-budget", type=float, default=None, metavar="GB",
              help="Memory the largest batch may use [default: the whole GPU; none on the CPU].")
@click.option("--decode-steps", type=int, default=32, show_default=True, help="Timed decode steps per point.")
@click.option("--max-batch", type=int, default=512, show_default=True, help="Upper bound of the batch search.")
@click.option("--sink", type=int, default=None, help="Sink tokens [default: the hybrid's, else 4].")
@click.option("--window", type=int, default=None, help="Window tokens [default: the hybrid's, else 1020].")
@click.option("--cuda-graphs", is_flag=True, default=False,
              help="Also time every runtime variant with its decode step replayed from a CUDA graph.")
@click.option("--compiled-baseline", is_flag=True, default=False,
              help="Also time the original with transformers' StaticCache + torch.compile(mode='reduce-overhead') "
                   "(CUDA only; compiles once per batch size).")
@click.option("--original/--no-original", default=True, show_default=True,
              help="Measure the model as stock transformers runs it (the 'x original' columns).")
@click.option("--fused-ops", type=click.Choice(["auto", "on", "off", "both"]), default="auto", show_default=True,
              help="Fused ops for the runtime variants (auto: on for CUDA); both: each runtime variant unfused and "
                   "fused, in one process.")
@click.option("--decode", default="dense", show_default=True, type=click.Choice(["dense", "tokenselect"]),
              help="tokenselect: also decode every runtime variant with TokenSelect on its full layers, on the same "
                   "cache, at a forced all-miss and all-hit Selection Cache (random weights make the real hit rate "
                   "meaningless), eager and with --cuda-graphs graphed.")
@token_select_options("TokenSelect", "the hybrid's, else ",
                      reuse_note=" (then one 'no cache' row); the rows force hits and misses whatever it is",
                      max_age_note=" before the query rescores (bounds the hits of the all-hit rows)")
@click.option("--select-hit-share", type=float, default=None, metavar="SHARE",
              help="TokenSelect: also interpolate the step time at this Selection Cache hit share (0-1), besides "
                   "0, 0.5 and 0.9.")
@click.option("--out", default="bench_results.json", show_default=True, metavar="PATH",
              help="Results JSON (a markdown table is written beside it), or a directory.")
@model_options
@verbosity_options
def bench(hybrid, baseline, report, contexts, ratios, memory_budget, decode_steps, max_batch, sink, window,
          cuda_graphs, compiled_baseline, original, fused_ops, decode, select_k, select_init, select_local, select_reuse,
          select_reuse_max_age, select_reuse_against, select_hit_share, out, device, dtype, trust_remote_code):
    """Prefill latency, decode tokens/s, peak memory and KV bytes: original vs hybrids, in one process."""
    from ..bench.speed import benchmark, markdown_bench

    if max_batch < 1:
        raise LightTransferError(f"--max-batch must be at least 1, got {max_batch}.")
    from ..bench.speed import write_bench_outputs
    from ..output_files import check_output_target

    check_output_target(out, "--out")  # before the work, not after
    err = stderr_console()
    result = benchmark(
        baseline=baseline, hybrid=hybrid, report=report, contexts=int_list(contexts, "--context"),
        ratios=float_list(ratios, "--ratios"), memory_budget_gb=memory_budget, decode_steps=decode_steps,
        max_batch=max_batch, sink=sink, window=window, device=device, dtype=dtype, cuda_graphs=cuda_graphs,
        compiled_baseline=compiled_baseline, original=original, fused_ops=fused_ops, decode=decode, select_k=select_k,
        select_init=select_init, select_local=select_local, select_reuse=select_reuse,
        select_reuse_max_age=select_reuse_max_age, select_reuse_against=select_reuse_against,
        select_hit_share=select_hit_share, out=None,
        progress=None if is_quiet() else (lambda line: err.print(escape(str(line)), soft_wrap=True)),
    )
    console = stdout_console()
    if not is_quiet():
        console.print(markdown_bench(result), soft_wrap=True, markup=False)
    write_bench_outputs(result, out)  # after the results are on the screen: a failed write loses nothing
    console.print(f"wrote {escape(str(out))}")


__all__ = ["bench"]
