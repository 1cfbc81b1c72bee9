"""Run the analysis: calibration rows through the model, lazy mass captured per layer, a report out.

:func:`analyze` takes a model spec (or a loaded model) and calibration sources; :func:`analyze_tokens` is the
core on ready token rows ``[samples, seq_len]``, with no tokenizer needed (benchmarks call it directly).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..architecture import model_shape
from ..errors import LightTransferError
from .aggregate import kv_head_stats, layer_stats, query_head_stats, rank_layers
from .capture import capture_lazy_mass
from .lazy_ratio import DEFAULT_BLOCK, head_statistics
from .report import AnalysisReport

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
DEFAULT_SEQ_LEN = 4096  # tokens per calibration sample, unless the model has fewer positions


def check_params(*, seq_len: int, samples: int, batch: int, sink: int, window: int, last: int,
                 threshold: float, max_positions: int | None = None) -> None:
    """Refuse analysis parameters that make no sense, with one line naming the option."""
    for name, value in (("seq-len", seq_len), ("samples", samples), ("batch", batch), ("sink", sink),
                        ("window", window), ("last", last)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise LightTransferError(f"--{name} (argument {name.replace('-', '_')}) must be a whole number, got "
                                     f"{value!r}; pass an int, e.g. {name.replace('-', '_')}=8.")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise LightTransferError(f"--threshold must be a number in [0, 1), got {threshold!r}.")
    if sink < 0:
        raise LightTransferError(f"--sink must be 0 or more tokens, got {sink}.")
    if window < 1:
        raise LightTransferError(f"--window must be at least 1 token, got {window}.")
    if last < 1:
        raise LightTransferError(f"--last must be at least 1 query, got {last}.")
    if samples < 1 or batch < 1:
        raise LightTransferError(f"--samples and --batch must be at least 1, got {samples} and {batch}.")
    if not 0.0 <= threshold < 1.0:
        raise LightTransferError(f"--threshold must be in [0, 1), got {threshold}.")
    if last > seq_len:
        raise LightTransferError(f"--last {last} is longer than --seq-len {seq_len}; lower --last.")
    if seq_len <= sink + window:
        raise LightTransferError(
            f"--seq-len {seq_len} is not longer than --sink + --window ({sink + window}): every key would be "
            "kept and every ratio would be 1; "
            + (f"the model has only {max_positions} positions, so lower --window (e.g. --window {max_positions // 4})."
               if max_positions is not None and max_positions <= sink + window else
               "raise --seq-len or lower --window.")
        )
    if max_positions is not None and seq_len > max_positions:
        raise LightTransferError(
            f"--seq-len {seq_len} is beyond the model's {max_positions} positions; pass --seq-len {max_positions} "
            "or less."
        )


def max_positions(model) -> int | None:
    """The model's maximum positions (``max_position_embeddings``), or ``None`` when it does not say."""
    return model_shape(model.config).max_positions


def _attention_shape(model) -> tuple[int, int, int]:
    shape = model_shape(model.config)
    return shape.num_layers, shape.num_heads, shape.num_kv_heads


def _input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def _decoder(model):
    # the base model skips the LM head: the analysis needs no logits
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return base if isinstance(base, torch.nn.Module) else model


def analyze_tokens(
    model,
    input_ids: torch.Tensor,
    *,
    sink: int = 4,
    window: int = 1020,
    last: int = 32,
    threshold: float = 0.1,
    batch: int = 1,
    block_size: int = DEFAULT_BLOCK,
    model_id: str | None = None,
    fingerprint: str | None = None,
    calibration: dict[str, Any] | None = None,
    seed: int = 0,
    on_sample: ProgressCallback | None = None,
) -> AnalysisReport:
    """Analyse ``input_ids [samples, seq_len]`` (int64) with a transformers causal LM; returns the report.

    Every sample is one unpadded row at positions ``0 .. seq_len - 1``; ``batch`` rows go through the model
    per forward. ``on_sample(done, total)`` is called after each forward.
    """
    from ..loading import model_fingerprint

    if input_ids.ndim != 2:
        raise LightTransferError(f"input_ids must be [samples, seq_len], got shape {tuple(input_ids.shape)}.")
    samples, seq_len = input_ids.shape
    check_params(seq_len=seq_len, samples=samples, batch=batch, sink=sink, window=window, last=last,
                 threshold=threshold, max_positions=max_positions(model))
    num_layers, num_heads, num_kv_heads = _attention_shape(model)
    device = _input_device(model)
    decoder = _decoder(model)
    was_training = model.training
    model.eval()
    lazy_rows, share_rows = [], []
    started = time.perf_counter()
    try:
        with torch.inference_mode(), capture_lazy_mass(model, last=last, sink=sink, window=window,
                                                       block_size=block_size) as recorder:
            for first in range(0, samples, batch):
                rows = input_ids[first : first + batch].to(device)
                decoder(input_ids=rows, use_cache=False)
                mass = recorder.take()  # [layers, batch, q_heads, last]
                stats = head_statistics(mass, threshold=threshold)  # each [layers, batch, q_heads]
                lazy_rows.append(stats["lazy_ratio"].permute(1, 0, 2))
                share_rows.append(stats["long_query_share"].permute(1, 0, 2))
                if on_sample is not None:
                    on_sample(min(first + batch, samples), samples)
    finally:
        model.train(was_training)
    elapsed = time.perf_counter() - started
    lazy = torch.cat(lazy_rows)  # [samples, layers, q_heads]
    share = torch.cat(share_rows)
    if lazy.shape[1:] != (num_layers, num_heads):
        raise LightTransferError(
            f"captured {lazy.shape[1]} layers x {lazy.shape[2]} heads, the config says "
            f"{num_layers} x {num_heads}; this architecture is not supported."
        )
    layers = layer_stats(lazy)
    dtype = next(model.parameters()).dtype
    return AnalysisReport(
        model_id=model_id or getattr(model.config, "_name_or_path", "") or type(model).__name__,
        fingerprint=fingerprint or model_fingerprint(model),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        params={
            "sink": sink, "window": window, "last": last, "threshold": threshold, "seq_len": int(seq_len),
            "samples": int(samples), "batch": batch, "seed": seed, "block_size": block_size,
            "dtype": str(dtype).removeprefix("torch."), "device": str(device),
            "attn_implementation": str(model.config._attn_implementation),
            "lazy_ratio_definition": "per-query sink + own window (kernels.mask.streaming_visible)",
            **_native_window_params(model.config),
        },
        calibration=calibration or {"samples": int(samples), "seq_len": int(seq_len),
                                    "tokens_used": int(samples * seq_len)},
        layers=layers,
        query_heads=query_head_stats(lazy, share),
        kv_heads=kv_head_stats(lazy, share, num_kv_heads=num_kv_heads),
        ranking=rank_layers([s.lazy_ratio.mean for s in layers]),
        timings={"analysis": round(elapsed, 4), "per_sample": round(elapsed / samples, 4),
                 "tokens_per_s": round(samples * seq_len / elapsed, 1)},
        peak_extra_memory_bytes=int(recorder.peak_workspace_bytes),
        environment=_environment(device),
    )


def _environment(device: torch.device) -> dict[str, Any]:
    from ..environment import device_facts, software_versions

    facts = device_facts(device)
    return {**software_versions(), "device_name": facts.get("gpu") or facts.get("cpu") or "cpu"}


def analyze(
    model,
    *,
    tokenizer=None,
    calib: str | Sequence[str] | None = None,
    seq_len: int | None = None,
    samples: int = 8,
    batch: int = 1,
    sink: int = 4,
    window: int = 1020,
    last: int = 32,
    threshold: float = 0.1,
    seed: int = 0,
    field: str = "text",
    device: str = "auto",
    dtype: str = "auto",
    progress: bool | ProgressCallback = False,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    device_map: str | dict | None = None,
    block_size: int = DEFAULT_BLOCK,
    method: str = "attention",
    gate_steps: int = 200,
    gate_samples: int | None = None,
    gate_l1: float = 0.01,
    gate_formats: str | Sequence[str] | None = None,
    gate_progress: ProgressCallback | None = None,
) -> AnalysisReport:
    """Profile a model's attention on calibration text: per-layer lazy ratios, per-head long-context scores.

    Args:
        model: a model directory, ``.gguf`` file or hub id; a :class:`~lighttransfer.loading.LoadedModel`;
            or a transformers causal LM (then pass ``tokenizer``, unless ``calib`` needs none).
        tokenizer: the tokenizer, when ``model`` is a bare transformers model.
        calib: calibration files, directories, globs, or ``synthetic:passkey``; ``None``: the shipped text.
        seq_len: tokens per sample (default: 4096, or the model's positions if fewer); samples: rows; batch: rows
            per forward pass.
        sink, window: the streaming rule the ratio measures (first ``sink`` tokens + own last ``window``).
        last: how many final queries of each sample are measured.
        threshold: long-context mass above which a query counts as reaching far back.
        seed: picks the calibration windows.
        field: JSONL field holding the text.
        device, dtype, trust_remote_code, attn_implementation, device_map: how to load a model from a spec
            (ignored for an already loaded model).
        progress: ``True`` logs each sample; a callable ``(done, total)`` is called after each forward.
        block_size: keys per block in the log-sum-exp.
        method: how KV heads are scored for ``convert``: ``attention`` (their attention mass beyond sink +
            window) or ``optimize`` (DuoAttention-style gates trained on synthetic passkey prompts with the model
            frozen, :func:`~lighttransfer.analysis.head_gates.optimize_head_gates`, attached to the report).
        gate_steps, gate_samples, gate_l1, gate_formats: with ``optimize``: optimizer steps, distinct prompts
            (default: ``samples``), L1 weight on the gates, passkey wordings (default: the training wordings).
        gate_progress: with ``optimize``, called ``(done, total)`` after each optimizer step.

    Raises:
        LightTransferError: bad options or calibration input, with one line saying what to do.
    """
    from ..calibration import check_sources, load_calibration
    from ..loading import LoadedModel, load_model, model_fingerprint

    # cheap checks first: a typo should not cost a model load
    if method not in ("attention", "optimize"):
        raise LightTransferError(f"--method {method!r} is not known; use attention or optimize.")
    if method == "optimize":
        from ..calibration.passkey import TRAINING_TEMPLATES, check_templates

        formats = check_templates(gate_formats if gate_formats is not None else TRAINING_TEMPLATES,
                                  option="--gate-formats")
        if isinstance(gate_steps, bool) or not isinstance(gate_steps, int) or gate_steps < 1:
            raise LightTransferError(f"--gate-steps must be a whole number of at least 1, got {gate_steps!r}.")
    fitted_seq_len = seq_len is None
    check_params(seq_len=DEFAULT_SEQ_LEN if fitted_seq_len else seq_len, samples=samples, batch=batch, sink=sink,
                 window=window, last=last, threshold=threshold)
    check_sources(calib, field=field)
    started = time.perf_counter()
    if isinstance(model, LoadedModel):
        loaded = model
    elif isinstance(model, torch.nn.Module):
        loaded = None
    else:
        loaded = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                            attn_implementation=attn_implementation, device_map=device_map)
    load_s = time.perf_counter() - started
    if loaded is not None:
        net, tok, model_id, fingerprint = loaded.model, tokenizer or loaded.tokenizer, loaded.model_id, loaded.fingerprint
    else:
        net, tok = model, tokenizer
        model_id = getattr(net.config, "_name_or_path", "") or type(net).__name__
        fingerprint = model_fingerprint(net)
    if tok is None:
        raise LightTransferError("analyze needs the model's tokenizer; pass tokenizer=... with a bare model.")
    if fitted_seq_len:
        seq_len = min(DEFAULT_SEQ_LEN, max_positions(net) or DEFAULT_SEQ_LEN)
    check_params(seq_len=seq_len, samples=samples, batch=batch, sink=sink, window=window, last=last,
                 threshold=threshold, max_positions=max_positions(net))

    started = time.perf_counter()
    calib_set = load_calibration(calib, tok, seq_len=seq_len, samples=samples, seed=seed, field=field)
    calib_s = time.perf_counter() - started
    log.info("calibration: %s, %d samples x %d tokens", calib_set.description, samples, seq_len)

    if progress is True:
        def on_sample(done: int, total: int) -> None:
            log.info("analysed %d/%d samples", done, total)
    else:
        on_sample = progress or None
    report = analyze_tokens(net, calib_set.input_ids, sink=sink, window=window, last=last, threshold=threshold,
                            batch=batch, block_size=block_size, model_id=model_id, fingerprint=fingerprint,
                            calibration=calib_set.to_dict(), seed=seed, on_sample=on_sample)
    report.timings = {"load": round(load_s, 4), "calibration": round(calib_s, 4), **report.timings}
    if method == "optimize":
        from .head_gates import attach_head_gates, optimize_head_gates

        gates = optimize_head_gates(net, tok, samples=gate_samples or samples, seq_len=seq_len, sink=sink,
                                    window=window, steps=gate_steps, l1=gate_l1, seed=seed, templates=formats,
                                    progress=gate_progress)
        attach_head_gates(report, gates)
    return report


def _native_window_params(config) -> dict:
    """The model's own sliding layers, for readers of the report (measured inside that window; convert skips them)."""
    from ..architecture import native_sliding_windows

    windows = native_sliding_windows(config)
    return {"native_sliding_layers": sorted(windows), "native_sliding_window": next(iter(windows.values()))} \
        if windows else {}


__all__ = ["analyze", "analyze_tokens", "check_params"]
