"""``lighttransfer convert`` and ``lighttransfer inspect``: thin click layers over the library."""

from __future__ import annotations

import json
import re

import click
from rich.markup import escape

from ..errors import LightTransferError
from .options import (
    is_quiet,
    model_options,
    stderr_console,
    stdout_console,
    token_select_options,
    verbosity_options,
)


def parse_layer_list(text: str | None, *, option: str) -> list[int] | None:
    """``"3,5,7"`` or ``"0-3,8"`` -> ``[3, 5, 7]`` / ``[0, 1, 2, 3, 8]``; ``None`` stays ``None``."""
    if text is None:
        return None
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            span = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
            if span:
                out.extend(range(int(span[1]), int(span[2]) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise LightTransferError(
                f"{option} '{text}': give layer indices as comma-separated integers or ranges, e.g. 3,5,7 or 0-3."
            ) from None
    if not out:
        raise LightTransferError(f"{option} '{text}' names no layer; e.g. {option} 3,5,7.")
    return out


def _rows_table(rows, *, num_kv_heads: int, title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    label = next((row.score_label for row in rows if row.score_label), None)
    names = ["layer", "attention", "KV heads streaming", "lazy ratio", *([label] if label else []), "rank", "why"]
    for name in names:
        table.add_column(name, justify="left" if name in ("attention", "why") else "right")
    styles = {"streaming": "bold cyan", "mixed": "yellow", "full": "dim"}
    for row in rows:
        score = ["—" if row.score is None else f"{row.score:.3f}"] if label else []
        table.add_row(str(row.layer), f"[{styles[row.kind]}]{row.kind}[/]", f"{row.streaming_heads}/{num_kv_heads}",
                      "—" if row.lazy_ratio is None else f"{row.lazy_ratio:.3f}", *score,
                      "—" if row.rank is None else str(row.rank), escape(str(row.reason)))
    return table


def _memory_table(memory, dtype: str | None = None):
    from rich.table import Table

    from ..hybrid_format import format_bytes

    table = Table(title=f"KV cache, batch 1, {dtype}" if dtype else "KV cache, batch 1", title_justify="left")
    for name in ("tokens", "original", "hybrid", "saved"):
        table.add_column(name, justify="right")
    for row in memory:
        table.add_row(f"{row.tokens:,}", format_bytes(row.dense_bytes), format_bytes(row.hybrid_bytes),
                      f"{100 * row.saved_fraction:.1f}%")
    return table


@click.command("convert")
@click.argument("model")
@click.argument("more_calib", nargs=-1, metavar="", required=False)
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Directory to write the hybrid checkpoint to.")
@click.option("--ratio", default=0.5, show_default=True, type=float,
              help="Share of layers (or, with --granularity head, of KV heads) to stream, in (0, 1].")
@click.option("--report", type=click.Path(dir_okay=False), help="Analysis report JSON from `lighttransfer analyze`; without it the analysis runs first.")
@click.option("--calib", multiple=True, metavar="FILE",
              help="Calibration text for the one-step analysis: .txt/.jsonl files, directories, globs or "
                   "synthetic:passkey; repeat the option or list several files after it. Default: the shipped text.")
@click.option("--layers", metavar="LIST", help="Streaming layers by hand, e.g. 3,5,7 or 10-20 (no analysis needed).")
@click.option("--keep", metavar="LIST", help="Layers that always keep full attention, e.g. 0,1.")
@click.option("--sink", default=4, show_default=True, type=int, help="Initial tokens every streaming query keeps.")
@click.option("--window", default=1020, show_default=True, type=int, help="Recent tokens every streaming query keeps (its own included).")
@click.option("--granularity", default="layer", show_default=True, type=click.Choice(["layer", "head"]),
              help="Stream whole layers, or individual KV heads model-wide.")
@click.option("--strategy", default="lazy", show_default=True, type=click.Choice(["lazy", "random", "least_lazy"]),
              help="lazy: highest lazy ratio first (the paper's rule); random and least_lazy are baselines.")
@click.option("--prefill", default="streaming", show_default=True, type=click.Choice(["streaming", "full"]),
              help="Runtime prefill policy stored in the checkpoint.")
@click.option("--native-swa", is_flag=True,
              help="Also write layer_types + sliding_window for stock loaders (window only, no sinks: less accurate).")
@click.option("--seq-len", default=None, type=int,
              help="Tokens per calibration sample (one-step analysis) [default: 4096, or the model's positions if fewer].")
@click.option("--samples", default=8, show_default=True, type=int, help="Calibration samples (one-step analysis).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for sampling and --strategy random.")
@click.option("--force", is_flag=True, help="Replace an existing checkpoint at --out.")
@click.option("--decode", default="dense", show_default=True, type=click.Choice(["dense", "tokenselect"]),
              help="How the runtime decodes the full layers: every cached key, or TokenSelect's selected keys "
                   "(arXiv 2411.02886; stored in the checkpoint block).")
@token_select_options("TokenSelect", max_age_note=" before the query rescores (bounds the decode step's index list)")
@click.option("--prefill-sparse", type=click.Choice(["sample", "vslash", "antidiag", "dense"]), default=None,
              help="Store block-sparse prefill of the full layers in the checkpoint block: the estimator (sampled "
                   "query rows, vertical-slash, antidiagonal) [default: none, dense prefill].")
@click.option("--prefill-alpha", type=float, default=None,
              help="Sparse prefill: share of the estimated attention mass kept per query block, in (0, 1] "
                   "[default: 0.95]; `lighttransfer sparse-mass` shows the trade-off.")
@click.option("--prefill-min-len", type=int, default=None,
              help="Sparse prefill: keys below which a prefill (or chunk) stays dense [default: 16384].")
@click.option("--head-routing", type=click.Choice(["qada", "random"]), default=None,
              help="Store a per-query KV-head routing of the full layers' decode in the block (qada: sink + window "
                   "when the predicted far share is <= --routing-tau; arXiv 2502.09647).")
@click.option("--routing-tau", type=float, default=None, help="Head routing: far-share threshold in [0, 1] "
              "(lighttransfer.calibrate_head_routing picks one for a target share).")
@click.option("--routing-share", type=float, default=None, help="Head routing 'random': local probability.")
@click.option("--routing-stats", type=click.Choice(["bulk", "local"]), default="bulk", show_default=True,
              help="Head routing: the Gaussian's moments from the bulk keys or the window keys.")
@click.option("--routing-cov", type=click.Choice(["full", "diag"]), default="full", show_default=True,
              help="Head routing: full or diagonal key covariance.")
@click.option("--routing-guard", type=click.Choice(["none", "pages", "heads"]), default="none", show_default=True,
              help="Head routing 'qada': needle guard; pages = also full when one page of bulk keys could, at its "
                   "key max/min score bound, take more than --routing-tau of the attention alone; heads = the "
                   "KV heads with the highest long-context scores of the analysis always full "
                   "(--routing-full-share of them).")
@click.option("--routing-full-share", type=float, default=None,
              help="Head routing with --routing-guard heads: share of the full layers' KV heads always full "
                   "[default: 0.25].")
@click.option("--routing-page", type=int, default=None,
              help="Head routing with --routing-guard pages: keys per page [default: 64].")
@model_options
@verbosity_options
def convert(model, more_calib, out, ratio, report, calib, layers, keep, sink, window, granularity, strategy, prefill,
            native_swa, seq_len, samples, seed, force, decode, select_k, select_init, select_local, select_reuse,
            select_reuse_max_age, select_reuse_against, prefill_sparse, prefill_alpha, prefill_min_len, head_routing,
            routing_tau, routing_share, routing_stats,
            routing_cov, routing_guard, routing_full_share, routing_page, device, dtype,
            trust_remote_code) -> None:
    """Write a hybrid checkpoint of MODEL (directory, .gguf file or hub id) whose laziest layers stream."""
    from ..convert.converter import convert as run_convert

    if more_calib and not calib:
        raise LightTransferError(f"unexpected argument(s) {' '.join(more_calib)}; calibration files go after --calib.",
                                 exit_code=2)
    routing = None
    if head_routing is not None:
        from ..hybrid_format import HeadRoutingConfig

        if routing_full_share is not None and routing_guard != "heads":
            raise LightTransferError("--routing-full-share needs --routing-guard heads.", exit_code=2)
        heads = routing_guard == "heads"  # the converter picks the heads once the layers are chosen
        routing = HeadRoutingConfig(mode=head_routing, tau=routing_tau, share=routing_share, stats=routing_stats,
                                    cov=routing_cov, guard="none" if heads else routing_guard, page=routing_page)
        if heads:
            routing_full_share = 0.25 if routing_full_share is None else routing_full_share
    elif (routing_tau is not None or routing_share is not None or routing_guard != "none" or routing_page is not None
          or routing_full_share is not None):
        raise LightTransferError("--routing-tau / --routing-share / --routing-guard / --routing-page / "
                                 "--routing-full-share need --head-routing.", exit_code=2)
    quiet = is_quiet()
    result = run_convert(
        model, out=out, ratio=ratio, report=report, calib=[*calib, *more_calib] or None,
        layers=parse_layer_list(layers, option="--layers"), keep=parse_layer_list(keep, option="--keep") or (),
        sink=sink, window=window, granularity=granularity, strategy=strategy, prefill=prefill,
        native_swa=native_swa, force=force, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
        progress=not quiet, seed=seed, seq_len=seq_len, samples=samples, decode=decode, select_k=select_k,
        select_init=select_init, select_local=select_local, select_reuse=select_reuse,
        select_reuse_max_age=select_reuse_max_age, select_reuse_against=select_reuse_against,
        prefill_sparse=prefill_sparse, prefill_alpha=prefill_alpha, prefill_min_len=prefill_min_len,
        head_routing=routing, routing_full_share=routing_full_share,
        status=None if quiet else (lambda line: stderr_console().print(f"[dim]{escape(line)}…[/dim]")),
    )
    console = stdout_console()
    console.soft_wrap = True  # plain lines stay whole for grep; tables still fit the terminal
    hybrid = result.hybrid
    if not quiet:
        console.print(_rows_table(result.rows, num_kv_heads=hybrid.num_kv_heads,
                                  title=f"Layer selection ({hybrid.granularity}, sink {hybrid.sink}, window {hybrid.window})"))
        console.print(_memory_table(result.memory))
        console.print(f"weights: {escape(str(result.weights))}; {result.tensors_verified} tensors checked against the source.")
    console.print(f"wrote {escape(str(result.out))} ({len(hybrid.streaming_layers)} of {hybrid.num_layers} layers streaming"
                  + (f", {len(hybrid.head_masks)} mixed" if hybrid.head_masks else "") + ")")
    if hybrid.selection is not None:
        console.print(f"full layers decode with {escape(hybrid.selection.describe())}")
    if hybrid.head_routing is not None:
        console.print(f"full layers decode with {escape(hybrid.head_routing_config().describe())}")


def _head_grid(hybrid):
    from rich.table import Table

    table = Table(title="KV heads", title_justify="left", caption="S = streaming, . = full", caption_justify="left")
    table.add_column("layer", justify="right")
    for h in range(hybrid.num_kv_heads):
        table.add_column(str(h), justify="center")
    for layer in range(hybrid.num_layers):
        table.add_row(str(layer), *("[cyan]S[/]" if s else "[dim].[/]" for s in hybrid.kv_head_mask(layer)))
    return table


@click.command("inspect")
@click.argument("checkpoint", type=click.Path())
@click.option("--dtype", "cache_dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Size the KV cache in this dtype (default: the weights' dtype in config.json).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@verbosity_options
def inspect(checkpoint, cache_dtype, as_json) -> None:
    """Show CHECKPOINT's hybrid layout and its KV-cache memory at 8k/32k/128k tokens (from config.json only)."""
    from ..convert.inspect_checkpoint import inspect_checkpoint

    result = inspect_checkpoint(checkpoint, dtype=cache_dtype)
    console = stdout_console()
    console.soft_wrap = True  # plain lines stay whole for grep; tables still fit the terminal
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, sort_keys=True))
        return
    hybrid = result.hybrid
    source = hybrid.source or {}
    streaming = ",".join(map(str, hybrid.streaming_layers)) or "none"
    console.print(f"[bold]{escape(str(result.path))}[/]: {escape(result.model_type)}, {hybrid.num_layers} layers x {hybrid.num_kv_heads} "
                  f"KV heads, head_dim {result.head_dim}, {result.dtype}")
    console.print(f"source: {escape(str(source.get('model_id', '?')))} "
                  f"(fingerprint {escape(str(source.get('fingerprint', '?')))})")
    console.print(f"streaming layers ({len(hybrid.streaming_layers)}/{hybrid.num_layers}): {streaming}")
    if hybrid.selection is not None:
        console.print(f"full layers decode with {escape(hybrid.selection.describe())}")
    console.print(f"sink {hybrid.sink} + window {hybrid.window} tokens; prefill {escape(str(hybrid.prefill))}; "
                  f"granularity {hybrid.granularity}; native sliding-window fields: {'yes' if hybrid.native_swa else 'no'}")
    if hybrid.calibration:
        c = hybrid.calibration
        console.print(escape(f"chosen with analysis sink {c.get('sink', '?')}, window {c.get('window', c.get('recent', '?'))}, "
                      f"seq_len {c.get('seq_len', '?')}, samples {c.get('samples', '?')}"))
    if result.finetune:
        f = result.finetune
        settings = f.get("settings", {})
        attention = "S²-Attn" if settings.get("s2_attn") else "dense attention"
        console.print(escape(f"fine-tuned: {f['steps']} steps, {f['tokens']:,} tokens, LoRA r {settings.get('lora_r', '?')} "
                             f"with {attention}; loss {f['first_loss']:.3f} -> {f['final_loss']:.3f}"))
    if hybrid.head_masks:
        console.print(_head_grid(hybrid))
    console.print(_memory_table(result.memory, result.dtype))
    console.print(escape(_vllm_line(hybrid)))


def _vllm_line(hybrid) -> str:
    """What lighttransfer's vLLM plugin would do with this checkpoint, in one line."""
    from ..hybrid_format import CONFIG_KEY
    from ..serving.vllm.grouping import vllm_grouping
    from ..serving.vllm.layout import served_layout

    try:
        layout = served_layout({CONFIG_KEY: hybrid.to_dict()})
    except LightTransferError as exc:
        return f"vLLM plugin: not served: {exc}"
    grouping = vllm_grouping(len(layout.streaming_layers), hybrid.num_layers - len(layout.streaming_layers))
    return "vLLM plugin: served; " + (grouping.describe() if grouping else "one KV cache group")


__all__ = ["convert", "inspect", "parse_layer_list"]
