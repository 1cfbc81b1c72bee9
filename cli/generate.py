"""``lighttransfer generate``: a thin click layer over :func:`lighttransfer.runtime.generation.generate_text`."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from ..errors import LightTransferError
from ..hybrid_format import format_bytes
from .options import is_quiet, model_options, stderr_console, token_select_options, verbosity_options


def _read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    if (prompt is None) == (prompt_file is None):
        raise LightTransferError("pass exactly one of --prompt TEXT and --prompt-file FILE.", exit_code=2)
    if prompt is not None:
        return prompt
    path = Path(prompt_file)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LightTransferError(f"--prompt-file '{path}' cannot be read as UTF-8 text ({exc}).") from exc


@click.command("generate")
@click.argument("model_dir")
@click.option("--prompt", help="The prompt text.")
@click.option("--prompt-file", type=click.Path(dir_okay=False), help="Read the prompt from this UTF-8 file.")
@click.option("--max-new-tokens", default=128, show_default=True, type=int, help="Tokens to generate at most.")
@click.option("--temperature", default=0.0, show_default=True, type=float,
              help="Sampling temperature; 0 decodes greedily.")
@click.option("--top-p", default=1.0, show_default=True, type=float, help="Nucleus sampling threshold.")
@click.option("--seed", type=int, help="Seed for reproducible sampling.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template as a user turn.")
@click.option("--prefill", type=click.Choice(["streaming", "full"]),
              help="Prefill policy; default: the checkpoint's (full = full attention, cache trimmed after).")
@click.option("--chunk-size", type=int, help="Prefill long prompts in chunks of this many tokens.")
@click.option("--online-ratio", type=float,
              help="Choose the streaming layers per prompt instead: this share of layers streams.")
@click.option("--decode", type=click.Choice(["dense", "tokenselect"]),
              help="How the full layers decode; default: the checkpoint's (tokenselect: TokenSelect's selected keys).")
@token_select_options("TokenSelect", "the checkpoint's, else ")
@click.option("--cuda-graphs/--no-cuda-graphs", default=False, show_default=True,
              help="Decode with the step captured once in a CUDA graph and replayed per token (static shapes, cache "
                   "reserved for prompt + --max-new-tokens); eager where no graph can be captured, with the reason.")
@click.option("--prefill-sparse", type=click.Choice(["sample", "vslash", "antidiag", "dense"]),
              help="Block-sparse prefill of the full layers (estimator), or dense; default: the checkpoint's.")
@click.option("--prefill-alpha", type=float, help="Sparse prefill: attention-mass share kept [default 0.95].")
@click.option("--prefill-min-len", type=int, help="Sparse prefill: keys below which it stays dense [default 16384].")
@click.option("--fused-ops/--no-fused-ops", default=None,
              help="Run RMSNorm, RoPE and SiLU-mul as fused kernels and q/k/v, gate/up as one GEMM each (Llama, "
                   "Mistral, Qwen2/3; Gemma 3's norms) [default: on for CUDA, off on the CPU].")
@click.option("--head-routing", type=click.Choice(["qada", "oracle", "random", "dense"]),
              help="Per-query KV-head routing of the full layers' decode (qada: sink + window when the predicted far "
                   "share is <= --routing-tau); default: the checkpoint's.")
@click.option("--routing-tau", type=float, help="Head routing: far-share threshold in [0, 1].")
@click.option("--routing-share", type=float, help="Head routing 'random': local probability.")
@click.option("--routing-stats", type=click.Choice(["bulk", "local"]),
              help="Head routing: the Gaussian's moments from the bulk keys or the window keys [default: bulk].")
@click.option("--routing-cov", type=click.Choice(["full", "diag"]), help="Head routing: covariance [default: full].")
@click.option("--routing-guard", type=click.Choice(["none", "pages"]),
              help="Head routing 'qada': needle guard (pages: a key max/min score bound per page of bulk keys) "
                   "[default: the checkpoint's, else none].")
@click.option("--routing-page", type=int, help="Head routing with --routing-guard pages: keys per page [default: 64].")
@model_options
@verbosity_options
def generate(model_dir, prompt, prompt_file, max_new_tokens, temperature, top_p, seed, chat, prefill, chunk_size,
             online_ratio, decode, select_k, select_init, select_local, select_reuse, select_reuse_max_age,
             select_reuse_against, cuda_graphs, prefill_sparse,
             prefill_alpha, prefill_min_len, fused_ops, head_routing, routing_tau, routing_share, routing_stats,
             routing_cov, routing_guard, routing_page, device, dtype, trust_remote_code):
    """Generate text with a hybrid checkpoint, streaming it as it is produced.

    MODEL_DIR is a directory written by `lighttransfer convert`. Afterwards the speed (tokens/s) and the
    KV-cache size (kept vs what the dense model would hold) are printed on stderr.
    """
    from ..runtime.generation import generate_text
    from ..runtime.loader import load_hybrid

    text = _read_prompt(prompt, prompt_file)
    loaded = load_hybrid(model_dir, device=device, dtype=dtype, prefill=prefill, chunk_size=chunk_size,
                         online_ratio=online_ratio, cuda_graphs=cuda_graphs, trust_remote_code=trust_remote_code,
                         decode=decode, select_k=select_k, select_init=select_init, select_local=select_local,
                         select_reuse=select_reuse, select_reuse_max_age=select_reuse_max_age,
                         select_reuse_against=select_reuse_against, prefill_sparse=prefill_sparse, prefill_alpha=prefill_alpha, prefill_min_len=prefill_min_len,
                         fused_ops=fused_ops, head_routing=head_routing, routing_tau=routing_tau,
                         routing_share=routing_share, routing_stats=routing_stats, routing_cov=routing_cov,
                         routing_guard=routing_guard, routing_page=routing_page)

    def emit(piece: str) -> None:
        click.echo(piece, nl=False)

    _, stats = generate_text(loaded.model, loaded.tokenizer, text, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, seed=seed, chat=chat, on_text=emit)
    click.echo()
    if not is_quiet():
        stderr_console().print(
            f"[dim]{stats.prompt_tokens} prompt tokens in {stats.prefill_seconds:.2f} s, {stats.new_tokens} new "
            f"tokens at {stats.decode_tokens_per_second:.1f} tokens/s; KV cache {format_bytes(stats.kv_bytes)} "
            f"kept vs {format_bytes(stats.dense_kv_bytes)} dense ({100 * stats.kv_fraction:.0f}%); decode: "
            f"{escape(stats.decode_path)}[/dim]")
        if stats.selection_lookups:
            stderr_console().print(
                f"[dim]TokenSelect: {stats.selection_hits} of {stats.selection_lookups} selections reused from the "
                f"Selection Cache ({100 * stats.selection_hit_rate:.0f}%)[/dim]")
        fused = loaded.model.lighttransfer_runtime.fused_ops
        if fused is not None:
            counts = ", ".join(f"{n} {kind}" for kind, n in sorted(fused.counts().items())) or "nothing supported"
            stderr_console().print(f"[dim]fused ops: {escape(counts)}[/dim]")
        routing = loaded.model.lighttransfer_runtime.head_routing
        if routing is not None and routing.stats.local_share() is not None:
            stderr_console().print(f"[dim]{escape(routing.config.describe())}: "
                                   f"{100 * routing.stats.local_share():.0f}% of (query, KV head) decisions "
                                   f"routed local[/dim]")
        sparse = loaded.model.lighttransfer_runtime.sparse_prefill
        if sparse is not None and sparse.stats.mean_density() is not None:
            stderr_console().print(f"[dim]sparse prefill ({sparse.config.method}, alpha {sparse.config.alpha}): "
                                   f"{100 * sparse.stats.mean_density():.0f}% of the causal key blocks[/dim]")
