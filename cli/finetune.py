"""``lighttransfer finetune``: a thin click layer over :func:`lighttransfer.training.finetune`."""

from __future__ import annotations

import math
import sys
import time

import click
from rich.markup import escape

from .options import is_quiet, model_options, stderr_console, stdout_console, verbosity_options

PLAIN_EVERY = 30.0  # seconds between progress lines when stderr is not a terminal


@click.command("finetune")
@click.argument("hybrid", metavar="HYBRID")
@click.argument("more_data", nargs=-1, metavar="", required=False)
@click.option("--data", multiple=True, metavar="FILE",
              help="Training text: .txt/.md/.jsonl files, directories or globs (as analyze --calib); repeat the "
                   "option or list several files after it. Keep the evaluation text out of it. synthetic:passkey "
                   "adds retrieval rows (a key hidden in that text, asked for at the row's end).")
@click.option("--passkey-rows", default=None, type=int,
              help="Synthetic passkey rows with synthetic:passkey [default: one per four text rows].")
@click.option("--seq-len", default=8192, show_default=True, type=int, help="Tokens per training row.")
@click.option("--steps", required=True, type=int, help="Optimizer steps (in all, when resuming).")
@click.option("--out", required=True, metavar="DIR", help="Write the fine-tuned checkpoint (or adapter) here.")
@click.option("--batch", default=1, show_default=True, type=int, help="Rows per optimizer step.")
@click.option("--lr", default=2e-5, show_default=True, type=float, help="AdamW learning rate (LongLoRA: 2e-5).")
@click.option("--warmup-steps", default=None, type=int,
              help="Linear warmup steps [default: min(20, steps/10)]; constant afterwards.")
@click.option("--lora-r", default=8, show_default=True, type=int, help="LoRA rank on q/k/v/o.")
@click.option("--lora-alpha", default=16, show_default=True, type=int, help="LoRA alpha (scale = alpha / r).")
@click.option("--lora-dropout", default=0.0, show_default=True, type=float, help="Dropout on the LoRA input.")
@click.option("--train-norms", is_flag=True, help="Also train every normalization layer (LongLoRA's LoRA+).")
@click.option("--train-embeddings", is_flag=True,
              help="Also train the input embedding (LoRA+). With tied embeddings (SmolLM2 and most small models) "
                   "that is also the output head: one matrix, 21% of SmolLM2-135M, kept tied in the output.")
@click.option("--s2-attn/--no-s2-attn", default=True, show_default=True,
              help="Full layers train with LongLoRA's shifted sparse attention (never wrapping) or dense causal "
                   "attention; streaming layers always train with their sink + window.")
@click.option("--group-frac", default=0.25, show_default=True, type=float,
              help="S²-Attn group size as a share of --seq-len.")
@click.option("--s2-sink", default=0, show_default=True, type=int,
              help="S²-Attn heads also see this many first tokens (SinkLoRA-style sinks; 0: plain S²-Attn).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds the LoRA init and the row order.")
@click.option("--field", default="text", show_default=True, help="JSONL field that holds the text.")
@click.option("--adapter-only", is_flag=True,
              help="Write the LoRA adapter in peft's format instead of a merged checkpoint.")
@click.option("--save-every", default=0, show_default=True, type=int,
              help="Save the resume state every N steps and after the last (0: never).")
@click.option("--state-dir", default=None, metavar="DIR", help="Where the resume state goes [default: OUT.state].")
@click.option("--resume", default=None, metavar="STATE_DIR",
              help="Continue a run from its saved state (same data and settings; --steps may grow).")
@click.option("--force", is_flag=True, help="Replace an existing checkpoint at --out.")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
              help="Recompute activations in the backward [default: on CUDA, off on the CPU].")
@click.option("--attention", default="auto", show_default=True, type=click.Choice(["auto", "flex", "dense"]),
              help="auto: FlexAttention block masks on CUDA, explicit masks on the CPU (short rows only).")
@click.option("--rope-scaling", default=None, type=click.Choice(["linear", "yarn"]),
              help="Context extension: scale RoPE to --rope-factor times the model's positions (linear: position "
                   "interpolation, as LongLoRA; yarn: YaRN), written into the output's config; train with a "
                   "--seq-len beyond the original positions.")
@click.option("--rope-factor", default=None, type=float, metavar="F",
              help="With --rope-scaling: the new positions over the model's (e.g. 4 for 8k -> 32k).")
@model_options
@verbosity_options
def finetune(hybrid, more_data, data, passkey_rows, seq_len, steps, out, batch, lr, warmup_steps, lora_r, lora_alpha, lora_dropout,
             train_norms, train_embeddings, s2_attn, group_frac, s2_sink, seed, field, adapter_only, save_every,
             state_dir, resume, force, gradient_checkpointing, attention, rope_scaling, rope_factor, device, dtype,
             trust_remote_code):
    """Recovery fine-tuning of a hybrid checkpoint: LoRA on the attention, trained with the hybrid's own masks.

    HYBRID is a directory written by `lighttransfer convert`. Streaming layers train with their sink + window
    attention, full layers with S²-Attn (LongLoRA; inference keeps them full). The output is a new hybrid
    checkpoint with the LoRA merged, its config block unchanged and a fine-tune record beside it, or with
    --adapter-only a peft adapter for HYBRID.

    \b
    The trainable share is printed first. LoRA r 8 on q/k/v/o is well under 1% of a model; --train-embeddings
    adds the embedding, which on a model with tied embeddings is the output head too (SmolLM2-135M: 21%).
    """
    from ..training import FinetuneSettings
    from ..training import finetune as run_finetune

    settings = FinetuneSettings(seq_len=seq_len, steps=steps, batch=batch, lr=lr, warmup_steps=warmup_steps,
                                lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                train_norms=train_norms, train_embeddings=train_embeddings, s2_attn=s2_attn,
                                group_frac=group_frac, s2_sink=s2_sink, seed=seed,
                                gradient_checkpointing=gradient_checkpointing, attention=attention,
                                rope_scaling=rope_scaling, rope_factor=rope_factor)
    err = stderr_console()
    quiet = is_quiet()
    progress = None
    task = None
    plain: dict[str, float] = {}

    def on_start(start) -> None:
        nonlocal progress, task
        if not quiet:
            err.print(f"[bold]fine-tuning[/bold] {escape(str(hybrid))}: {escape(start.layout_description)}")
            err.print(f"  {escape(start.share.describe())}")
            passkey = f", {start.data.passkey_rows} of them passkey rows" if start.data.passkey_rows else ""
            err.print(f"  data: {start.data.num_rows} rows of {start.data.seq_len} tokens{passkey} from "
                      f"{len(start.data.files)} file(s) ({start.data.total_tokens:,} tokens); attention "
                      f"{start.backend} on {start.device}, {start.dtype}")
            if start.rope is not None:
                err.print(f"  RoPE: {start.rope.kind} x {start.rope.factor:g}, positions "
                          f"{start.rope.original_positions:,} -> {start.rope.positions:,} (in the output's config)")
            for line in start.warnings:
                err.print(f"[yellow]warning:[/yellow] {escape(line)}")
        if quiet:
            return
        if not err.is_terminal:  # logs, nohup: a plain line every 30 s instead of a bar nobody sees
            plain["started"] = plain["last"] = time.monotonic()
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"),
                            TimeRemainingColumn(), console=err, transient=False)
        progress.start()
        task = progress.add_task("train", total=settings.steps, completed=start.first_step, loss="-", speed="-")

    def on_step(report) -> None:
        if progress is not None:
            progress.update(task, completed=report.step, loss=f"{report.loss:.3f}",
                            speed=f"{report.tokens_per_second:,.0f}")
            return
        now = time.monotonic()
        if "last" in plain and (now - plain["last"] >= PLAIN_EVERY or report.step == report.steps):
            plain["last"] = now
            print(f"finetune: step {report.step}/{report.steps}, loss {report.loss:.3f}, "
                  f"{report.tokens_per_second:,.0f} tok/s, {now - plain['started']:.0f} s", file=sys.stderr,
                  flush=True)

    try:
        result = run_finetune(hybrid, data=list(data) + list(more_data), out=out, settings=settings,
                              adapter_only=adapter_only, resume=resume, save_every=save_every, state_dir=state_dir,
                              force=force, field=field, passkey_rows=passkey_rows, device=device, dtype=dtype,
                              trust_remote_code=trust_remote_code, on_start=on_start, on_step=on_step)
    finally:
        if progress is not None:
            progress.stop()
    record = result.record
    kind = "adapter (peft)" if adapter_only else "hybrid checkpoint, LoRA merged"
    stdout_console().print(f"wrote {escape(str(result.out))} ({kind})")
    if not quiet:
        first, final = record.first_loss, record.final_loss
        err.print(f"  loss {first:.3f} -> {final:.3f} (perplexity {math.exp(first):.2f} -> {math.exp(final):.2f}; "
                  f"means of the first and last steps) in {result.seconds:.0f} s")
        if result.state_dir is not None:
            err.print(f"  resume state: {escape(str(result.state_dir))}")
