"""``lighttransfer finetune``: recovery fine-tuning of a hybrid checkpoint with the masks it runs.

The loop, in order:

1. everything the user can get wrong is checked before the model loads: settings, ``--data`` files, ``--out`` (and
   ``--force``), the state directory, ``--resume``;
2. the hybrid loads as a plain transformers model (bf16 on CUDA, fp32 on the CPU), its layout from the
   checkpoint's ``lighttransfer`` block; LoRA goes on the attention projections (:mod:`.lora`);
3. each step runs the model inside :func:`~lighttransfer.training.attention.training_attention`: streaming
   layers (or KV heads) attend with their sink + window, full layers with S²-Attn (``s2_attn``) or dense causal
   attention, the model's own sliding layers with their window; loss = next-token cross-entropy over whole rows;
   AdamW, linear warmup, gradient clipping, autocast to bf16 and gradient checkpointing on CUDA;
4. the state is saved every ``save_every`` steps (resumable with ``resume``); at the end the output is written
   in one piece: a hybrid checkpoint with the LoRA merged and a fine-tune record beside its block, or the adapter
   alone in peft's format (``adapter_only``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..architecture import model_shape
from ..convert.staging import check_target, staged_directory
from ..convert.writer import LICENSE_PATTERNS, copy_aux_files
from ..errors import LightTransferError
from ..hybrid_format import FINETUNE_FILE, FinetuneRecord, HybridConfig
from ..loading import load_model, model_fingerprint, resolve_device
from ..output_files import write_json
from ..runtime.layout import resolve_layout
from .attention import TrainingAttention, resolve_backend, training_attention
from .data import TrainingData, check_data_sources, load_training_data
from .lora import TrainableShare, add_lora, require_peft, trainable_share
from .rope import RopeExtension, check_rope_extensible, extend_rope, extended_positions
from .settings import FinetuneSettings
from .state import (
    TrainState,
    check_resumable,
    check_state_target,
    default_state_dir,
    load_into,
    read_state,
    save_state,
)

log = logging.getLogger(__name__)

# the record's first/final loss: mean over this many steps at each end of the run (fewer on short runs)
LOSS_SPAN = 10


@dataclass(frozen=True)
class StepReport:
    """One optimizer step, for progress displays: ``step`` is 1-based; ``loss`` in nats per token."""

    step: int
    steps: int
    loss: float
    lr: float
    tokens_per_second: float
    seconds: float


@dataclass
class FinetuneStart:
    """What is about to train (for the CLI's first lines)."""

    share: TrainableShare
    data: TrainingData
    layout_description: str
    first_step: int
    backend: str
    device: str
    dtype: str
    warnings: list[str] = field(default_factory=list)
    rope: RopeExtension | None = None  # the context extension, when --rope-scaling asked for one


@dataclass
class FinetuneResult:
    """What :func:`finetune` wrote: ``out`` (checkpoint or adapter), its record, the per-step losses."""

    out: Path
    record: FinetuneRecord
    losses: list[float]
    share: TrainableShare
    state_dir: Path | None
    seconds: float


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def _versions() -> dict[str, str]:
    import transformers

    peft = require_peft()
    return {"lighttransfer": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def read_block(hybrid) -> tuple[HybridConfig, dict]:
    """The ``lighttransfer`` block of ``HYBRID/config.json`` and the config itself, read before any weight; one
    line when there is none."""
    import json

    config = Path(hybrid).expanduser() / "config.json"
    if not config.is_file():
        raise LightTransferError(f"HYBRID '{hybrid}' is not a checkpoint directory (no config.json); pass one "
                                 "written by `lighttransfer convert`.")
    try:
        raw = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise LightTransferError(f"HYBRID '{hybrid}': config.json cannot be read ({exc}).") from exc
    block = HybridConfig.from_model_config(raw, origin=str(config))
    if block is None:
        raise LightTransferError(f"HYBRID '{hybrid}' has no 'lighttransfer' block in its config.json; convert the "
                                 "model first (lighttransfer convert MODEL --out HYBRID).")
    return block, raw


def check_finetune_inputs(hybrid, *, data: Sequence[str], out, settings: FinetuneSettings, field: str = "text",
                          force: bool = False, resume=None, state_dir=None, save_every: int = 0,
                          device: str | torch.device = "auto", adapter_only: bool = False) -> Path | None:
    """Every check that needs no weights: raises a one-line error before anything heavy happens. Returns the
    state directory that will be written (``None`` when ``save_every`` is 0)."""
    require_peft()
    _, config = read_block(hybrid)
    shape = model_shape(config, source=f"HYBRID '{hybrid}'")
    if settings.rope_scaling is not None:
        check_rope_extensible(config, where=f"HYBRID '{hybrid}'")
        if adapter_only:
            raise LightTransferError("--rope-scaling changes the model's config, which a peft adapter does not "
                                     "carry: leave out --adapter-only (the merged checkpoint holds the scaled RoPE).")
    if shape.max_positions:
        limit = shape.max_positions if settings.rope_scaling is None \
            else extended_positions(shape.max_positions, settings.rope_factor)
        if settings.seq_len > limit and settings.rope_scaling is None:
            raise LightTransferError(f"--seq-len {settings.seq_len} is beyond the model's {shape.max_positions} "
                                     f"positions; pass at most that, or extend the context with --rope-scaling "
                                     "linear|yarn --rope-factor F.")
        if settings.seq_len > limit:
            raise LightTransferError(f"--seq-len {settings.seq_len} is beyond the model's {shape.max_positions} "
                                     f"positions x {settings.rope_factor:g} (--rope-factor) = {limit}; pass at most "
                                     "that, or a larger --rope-factor.")
    resolve_backend(settings.attention, resolve_device(device))
    check_data_sources(data, field=field)
    target = Path(out).expanduser().absolute()
    if target == Path(hybrid).expanduser().absolute():
        raise LightTransferError("--out must differ from HYBRID: the fine-tune reads its weights while writing.")
    check_target(target, force=force)
    from ..output_files import check_output_dir

    check_output_dir(target, "--out")
    if save_every < 0:
        raise LightTransferError(f"--save-every must be >= 0, got {save_every}.")
    if resume is not None:
        done = read_state(resume).step
        if done >= settings.steps:
            raise LightTransferError(f"--resume '{resume}' has already done {done} steps; pass --steps above "
                                     f"{done} to train further.")
    if save_every == 0:
        return None
    path = Path(state_dir).expanduser().absolute() if state_dir is not None else default_state_dir(target)
    check_state_target(path)
    return path


def finetune(
    hybrid: str | os.PathLike[str],
    *,
    data: Sequence[str],
    out: str | os.PathLike[str],
    settings: FinetuneSettings | None = None,
    adapter_only: bool = False,
    resume: str | os.PathLike[str] | None = None,
    save_every: int = 0,
    state_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    field: str = "text",
    passkey_rows: int | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    on_start: Callable[[FinetuneStart], None] | None = None,
    on_step: Callable[[StepReport], None] | None = None,
) -> FinetuneResult:
    """Fine-tune the hybrid checkpoint ``hybrid`` on ``data`` and write the result to ``out``.

    Args:
        hybrid: a directory written by ``lighttransfer convert`` (or an earlier ``finetune``).
        data: ``.txt``/``.md``/``.jsonl`` files, directories or globs (as ``analyze --calib``), and optionally
            ``synthetic:passkey`` (retrieval rows hidden in that text).
        out: the output directory: a merged hybrid checkpoint, or with ``adapter_only`` a peft adapter
            (``adapter_config.json`` + ``adapter_model.safetensors``) and ``lighttransfer_finetune.json``.
        settings: what to train and how (:class:`FinetuneSettings`; defaults: LoRA r 8 / alpha 16 on q/k/v/o,
            S²-Attn, lr 2e-5, 8192 tokens per row).
        resume: a state directory of an earlier run (same settings and data) to continue from.
        save_every: write the resume state every this many steps (and after the last); 0: never.
        state_dir: where the state goes (default ``OUT.state`` beside ``out``).
        force: replace an existing checkpoint at ``out``.
        field: JSONL field holding the text.
        passkey_rows: synthetic passkey rows with ``synthetic:passkey`` in ``data`` (default: one per four text
            rows); they use the six training wordings, ``needle`` and ``locker`` stay out.
        device, dtype: as :func:`lighttransfer.load` (``auto``: CUDA + bf16 when present, else CPU + fp32).
        on_start, on_step: progress callbacks (the CLI's bar).

    Raises:
        LightTransferError: bad input (checked before the model loads where possible), no layout in the block,
            ``--seq-len`` past the model's positions, a resume state that does not match.
    """
    settings = settings or FinetuneSettings()
    state_path = check_finetune_inputs(hybrid, data=data, out=out, settings=settings, field=field, force=force,
                                       resume=resume, state_dir=state_dir, save_every=save_every, device=device,
                                       adapter_only=adapter_only)
    previous_state = read_state(resume) if resume is not None else None

    loaded = load_model(hybrid, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    model, tokenizer = loaded.model, loaded.tokenizer
    block, config = read_block(hybrid)
    previous_record = FinetuneRecord.from_model_config(config, origin=f"{hybrid}/config.json")
    layout = resolve_layout(model.config, source=f"HYBRID '{hybrid}'")
    warnings = []
    extension = None
    if settings.rope_scaling is not None:
        extension = extend_rope(model, settings.rope_scaling, settings.rope_factor)
        if settings.seq_len <= extension.original_positions:
            warnings.append(f"--seq-len {settings.seq_len} is within the model's original "
                            f"{extension.original_positions} positions: training does not reach the extended "
                            f"range ({extension.positions}); use a longer --seq-len.")
    if layout.num_streaming_layers or layout.mixed_masks:
        if settings.seq_len <= layout.sink + layout.window:
            warnings.append(f"--seq-len {settings.seq_len} is within sink + window ({layout.sink} + "
                            f"{layout.window}): the streaming layers see every token, so training does not teach "
                            "them their bounded attention; use a longer --seq-len.")
    else:
        warnings.append("the checkpoint has no streaming layer: every layer trains as a full layer.")
    dev = next(model.parameters()).device
    backend = resolve_backend(settings.attention, dev)
    base_dtype = next(model.parameters()).dtype
    base = {"model_id": str(hybrid), "fingerprint": model_fingerprint(model)}

    rows = load_training_data(data, tokenizer, seq_len=settings.seq_len, seed=settings.seed, field=field,
                              passkey_count=passkey_rows)
    data_record = rows.to_dict()
    if previous_state is not None:
        check_resumable(previous_state, settings, data=data_record, base=base, where=str(resume))

    model.config.use_cache = False
    peft_model = add_lora(model, r=settings.lora_r, alpha=settings.lora_alpha, dropout=settings.lora_dropout,
                          train_norms=settings.train_norms, train_embeddings=settings.train_embeddings,
                          seed=settings.seed)
    share = trainable_share(peft_model)
    checkpointing = settings.gradient_checkpointing
    if checkpointing is None:
        checkpointing = dev.type == "cuda"
    if checkpointing:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.95))

    first_step, losses, seconds = 0, [], 0.0
    if previous_state is not None:
        load_into(Path(resume), peft_model, optimizer)
        first_step, losses, seconds = previous_state.step, list(previous_state.losses), previous_state.seconds
        log.info("resuming from %s at step %d", resume, first_step)

    if on_start is not None:
        on_start(FinetuneStart(share=share, data=rows, layout_description=layout.describe(), first_step=first_step,
                               backend=backend, device=str(dev), dtype=str(base_dtype).removeprefix("torch."),
                               warnings=warnings, rope=extension))
    for line in warnings:
        log.warning("%s", line)

    attention = TrainingAttention(layout=layout, s2_attn=settings.s2_attn, group_frac=settings.group_frac,
                                  s2_sink=settings.s2_sink, backend=backend)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" and base_dtype == torch.bfloat16 \
        else torch.autocast(dev.type, enabled=False)
    state_of = lambda step: TrainState(step=step, losses=losses, settings=settings.to_dict(), data=data_record,
                                       base=base, seconds=seconds)
    peft_model.train()
    with training_attention(peft_model, attention):
        for step in range(first_step, settings.steps):
            start = time.perf_counter()
            lr = settings.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            ids = rows.batch(step, settings.batch).to(dev)
            with autocast:
                loss = peft_model(input_ids=ids, labels=ids, use_cache=False).loss
            if not torch.isfinite(loss):
                raise LightTransferError(f"the loss became {loss.item()} at step {step + 1}; lower --lr (now "
                                         f"{settings.lr}) or train in float32 (--dtype float32).")
            loss.backward()
            if settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            elapsed = time.perf_counter() - start
            seconds += elapsed
            losses.append(float(loss.item()))
            if on_step is not None:
                on_step(StepReport(step=step + 1, steps=settings.steps, loss=losses[-1], lr=lr,
                                   tokens_per_second=ids.numel() / max(elapsed, 1e-9), seconds=elapsed))
            done = step + 1
            if state_path is not None and (done % save_every == 0 or done == settings.steps):
                save_state(state_path, state_of(done), peft_model, optimizer)
    peft_model.eval()

    span = max(1, min(LOSS_SPAN, len(losses) // 2))  # the two ends never overlap
    record = FinetuneRecord(
        output="adapter" if adapter_only else "merged", steps=settings.steps,
        tokens=settings.steps * settings.batch * settings.seq_len,
        final_loss=_mean(losses[-span:]), first_loss=_mean(losses[:span]),
        settings=dict(settings.to_dict(), rope=extension.to_dict() if extension is not None else None, backend=backend, device=dev.type, dtype=str(base_dtype).removeprefix("torch."),
                      gradient_checkpointing=bool(checkpointing), trainable_parameters=share.trainable,
                      total_parameters=share.total),
        data=data_record, base=base, versions=_versions(),
        previous=previous_record.to_dict() if previous_record is not None else None)
    target = Path(out).expanduser().absolute()
    src_dir = Path(hybrid).expanduser()
    with staged_directory(target, force=force) as tmp:
        if adapter_only:
            _write_adapter(peft_model, tmp, record)
        else:
            _write_merged(peft_model, tmp, block, record, base_dtype)
        tokenizer.save_pretrained(tmp)
        copy_aux_files(src_dir, tmp, LICENSE_PATTERNS)
    log.info("wrote %s", target)
    return FinetuneResult(out=target, record=record, losses=losses, share=share, state_dir=state_path,
                          seconds=seconds)


def _write_merged(peft_model, tmp: Path, block: HybridConfig, record: FinetuneRecord, dtype: torch.dtype) -> None:
    merged = peft_model.merge_and_unload()
    merged = merged.to(dtype)
    if getattr(merged, "_tied_weights_keys", None) and merged.config.get_text_config().tie_word_embeddings:
        merged.tie_weights()
    merged.config.use_cache = True
    block.attach(merged.config)  # the layout is unchanged; the record goes beside the block
    record.attach(merged.config)
    merged.save_pretrained(tmp, safe_serialization=True)


def _write_adapter(peft_model, tmp: Path, record: FinetuneRecord) -> None:
    peft_model.save_pretrained(tmp)
    write_json(tmp / FINETUNE_FILE, record.to_dict())


def perplexity_of(loss: float | None) -> float | None:
    """``exp(loss)`` for a mean loss in nats per token."""
    return math.exp(loss) if loss is not None else None


__all__ = ["finetune", "check_finetune_inputs", "FinetuneResult", "FinetuneStart", "StepReport", "perplexity_of"]
