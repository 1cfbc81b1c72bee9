"""``convert``: write a hybrid checkpoint whose laziest layers (or KV heads) use streaming attention.

The output is a complete transformers model directory: the source's tensors unchanged in safetensors, the
source's ``config.json`` plus the ``lighttransfer`` block (:class:`HybridConfig`), the per-head scores in a
sidecar, tokenizer/generation/license files, and a model card. It is built in a temp directory beside the
target and renamed into place only after every tensor was read back and checked.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LightTransferError
from ..gguf_metadata import read_gguf_metadata
from ..loading import (
    LoadedModel,
    ModelSource,
    load_config,
    load_model,
    model_fingerprint,
    resolve_model_source,
)
from .hybrid_config import CONFIG_KEY, SIDECAR_NAME, HybridConfig
from .kv_memory import DTYPE_BYTES, KVMemoryRow, kv_memory_table
from .model_card import FIGURE_NAME, plot_selection, render_model_card
from .native_swa import NATIVE_SWA_WARNING, native_sliding_layers, native_sliding_windows, native_swa_fields
from .selection import (
    STRATEGIES,
    SelectionRow,
    check_layer_indices,
    check_ratio,
    explain_selection,
    select_kv_heads,
    select_layers,
    split_head_masks,
)
from .staging import check_target, staged_directory
from .weights import (
    WrittenWeights,
    source_weight_files,
    verify_weights,
    write_bin_as_safetensors,
    write_model_weights,
    write_safetensors_shards,
)

log = logging.getLogger(__name__)

# files beside the weights that a checkpoint needs or must keep (tokenizers, chat templates, licenses)
AUX_PATTERNS = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "spiece.model", "vocab.json", "vocab.txt", "merges.txt", "*.tiktoken", "chat_template.jinja",
    "chat_template.json", "generation_config.json",
)
LICENSE_PATTERNS = ("LICENSE*", "LICENCE*", "License*", "license*", "NOTICE*", "COPYING*", "USE_POLICY*")
SIDECAR_FORMAT_VERSION = 1
HEATMAP_NAME = "lighttransfer_heatmap.png"


@dataclass
class ConvertResult:
    """What ``convert`` wrote.

    Attributes:
        out: the checkpoint directory.
        hybrid: the ``lighttransfer`` block written into its ``config.json``.
        rows: one :class:`SelectionRow` per layer: what was chosen and why.
        memory: KV-cache bytes of the source and the hybrid at 8k/32k/128k tokens (batch 1).
        weights: how the weights were written (hard-linked, copied, converted, saved).
        tensors_verified: tensors read back and checked against the source.
        warnings: things the user should know (also logged).
    """

    out: Path
    hybrid: HybridConfig
    rows: list[SelectionRow]
    memory: list[KVMemoryRow]
    weights: str
    tensors_verified: int
    warnings: list[str] = field(default_factory=list)


def _check_options(*, ratio, sink, window, granularity, strategy, prefill, layers) -> None:
    check_ratio(ratio)
    if not isinstance(window, int) or window < 1:
        raise LightTransferError(f"--window {window}: the window must be at least 1 token (it includes the query itself).")
    if not isinstance(sink, int) or sink < 0:
        raise LightTransferError(f"--sink {sink}: the number of sink tokens must be 0 or more.")
    if granularity not in ("layer", "head"):
        raise LightTransferError(f"--granularity {granularity}: use 'layer' or 'head'.")
    if strategy not in STRATEGIES:
        raise LightTransferError(f"--strategy {strategy}: use one of {', '.join(STRATEGIES)}.")
    if prefill not in ("streaming", "full"):
        raise LightTransferError(f"--prefill {prefill}: use 'streaming' or 'full'.")
    if layers is not None and granularity == "head":
        raise LightTransferError("--layers picks whole layers; drop --granularity head or drop --layers.")


def _local_source(source: ModelSource) -> ModelSource:
    """A hub id becomes the local snapshot directory (downloaded, or from the cache when offline)."""
    if source.kind != "hub":
        return source
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(source.spec, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model",
                                                             "*.txt", "*.jinja", "*.tiktoken", "LICENSE*", "NOTICE*"])
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise LightTransferError(
            f"could not fetch '{source.spec}' from the hub ({first}); pass a local model directory or a .gguf file."
        ) from exc
    return ModelSource(source.spec, "directory", Path(path))


def _text_config(config):
    return getattr(config, "text_config", None) or config


def fingerprint_from_config(config) -> str:
    """The :func:`~lighttransfer.loading.model_fingerprint` of a model, computed without loading weights
    (the model is built on the meta device: parameter names and shapes only)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    return model_fingerprint(model)


def _load_report(report):
    if report is None or not isinstance(report, (str, os.PathLike)):
        return report
    from ..analysis.report import AnalysisReport

    return AnalysisReport.load(report)


def _check_report(report, *, fingerprint: str, model_id: str, num_layers: int, num_kv_heads: int,
                  sink: int, window: int, warnings: list[str]) -> None:
    if report.fingerprint != fingerprint:
        raise LightTransferError(
            f"the report was made for model '{report.model_id}' (fingerprint {report.fingerprint}), not for "
            f"'{model_id}' (fingerprint {fingerprint}); run `lighttransfer analyze` on this model, or pass the "
            "model the report belongs to."
        )
    if report.num_layers != num_layers or report.num_kv_heads != num_kv_heads:
        raise LightTransferError(
            f"the report describes {report.num_layers} layers x {report.num_kv_heads} KV heads, the model has "
            f"{num_layers} x {num_kv_heads}; the report is for another model."
        )
    params = dict(report.params or {})
    if params.get("sink", sink) != sink or params.get("recent", window) != window:
        warnings.append(
            f"the report measured lazy ratios with sink {params.get('sink')} and window {params.get('recent')}, "
            f"but the hybrid will use sink {sink} and window {window}; the layer choice may not fit. "
            "Rerun the analysis with --sink/--recent equal to --sink/--window."
        )


def _copy_aux_files(src_dir: Path, dst_dir: Path, patterns: Iterable[str]) -> list[str]:
    copied = []
    for pattern in patterns:
        for path in sorted(src_dir.glob(pattern)):
            if path.is_file() and not (dst_dir / path.name).exists():
                shutil.copyfile(path, dst_dir / path.name)
                copied.append(path.name)
    return copied


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _sidecar(report, *, model_id: str, fingerprint: str) -> dict[str, Any]:
    data: dict[str, Any] = {
        "format_version": SIDECAR_FORMAT_VERSION,
        "model_id": model_id,
        "fingerprint": fingerprint,
        "params": dict(report.params or {}),
        "layer_lazy_ratios": list(report.layer_lazy_ratios()),
        "kv_head_long_context_scores": [list(r) for r in report.kv_head_long_context_scores()],
    }
    head_ratios = getattr(report, "head_lazy_ratios", None)
    if callable(head_ratios):
        data["head_lazy_ratios"] = [list(r) for r in head_ratios()]
    return json.loads(json.dumps(data, default=float))


def convert(
    model: str | os.PathLike[str] | LoadedModel,
    *,
    out: str | os.PathLike[str],
    ratio: float = 0.5,
    report=None,
    calib: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    layers: Iterable[int] | None = None,
    keep: Iterable[int] = (),
    sink: int = 4,
    window: int = 1020,
    granularity: str = "layer",
    strategy: str = "lazy",
    prefill: str = "streaming",
    native_swa: bool = False,
    force: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    progress: bool = False,
    seed: int = 0,
    seq_len: int = 4096,
    samples: int = 8,
) -> ConvertResult:
    """Write a hybrid checkpoint of ``model`` into ``out``.

    Args:
        model: a model directory (safetensors or ``.bin``), a ``.gguf`` file, a hub id, or a loaded model.
        out: the directory to create.
        ratio: share of layers (``granularity="layer"``) or of all KV heads (``"head"``) to stream, in (0, 1].
        report: an :class:`~lighttransfer.analysis.report.AnalysisReport` or the path of its JSON; without
            it (and without ``layers``) the analysis runs first, on ``calib`` or the shipped default text,
            with ``sink``/``window`` as the kept tokens so that the choice fits the runtime.
        calib: calibration text file(s) for that analysis.
        layers: the streaming layers given by hand (no analysis needed).
        keep: layers that always stay full attention.
        sink: tokens at the start every streaming query keeps (>= 0).
        window: most recent tokens every streaming query keeps, its own included (>= 1).
        granularity: ``layer`` (whole layers stream) or ``head`` (individual KV heads).
        strategy: ``lazy`` (the paper's rule), ``least_lazy`` or ``random`` (seeded by ``seed``).
        prefill: the runtime's prefill policy, ``streaming`` or ``full``.
        native_swa: also write ``layer_types`` + ``sliding_window`` for stock loaders (window only, no sinks).
        force: replace an existing checkpoint at ``out``.
        device, dtype: where and in which dtype the analysis runs; for a GGUF source, ``dtype`` is also the
            dtype of the written weights (float32 when ``auto``).
        trust_remote_code: allow the model's own code.
        progress: show the analysis progress bar.
        seed: seed of the analysis sampling and of ``strategy="random"``.
        seq_len, samples: calibration windows of the one-step analysis (tokens per sample, number of samples).

    Raises:
        LightTransferError: bad options, an existing ``out`` without ``force``, a report for another model,
            a full disk, or a written tensor that does not match the source.
    """
    _check_options(ratio=ratio, sink=sink, window=window, granularity=granularity, strategy=strategy,
                   prefill=prefill, layers=layers)
    out = Path(out).expanduser()
    check_target(out.absolute(), force=force)
    keep = list(keep)
    layers = None if layers is None else list(layers)
    warnings: list[str] = []

    loaded = model if isinstance(model, LoadedModel) else None
    given = loaded.source if loaded else resolve_model_source(model)
    model_id, hub_id = given.model_id, given.spec if given.kind == "hub" else None
    source = _local_source(given)
    if source.path is not None and out.absolute().resolve() in (source.path, source.path.parent if
                                                                source.kind == "gguf" else None):
        raise LightTransferError(f"--out '{out}' is where the source model lives; choose another directory.")
    config = loaded.model.config if loaded else load_config(source, trust_remote_code=trust_remote_code)
    text_config = _text_config(config)
    num_layers = int(text_config.num_hidden_layers)
    num_kv_heads = int(getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads)
    keep = check_layer_indices(keep, num_layers, option="--keep")
    if layers is not None:
        check_layer_indices(layers, num_layers, option="--layers")
    native = native_sliding_layers(text_config)
    own_window = getattr(text_config, "sliding_window", "?")
    if native_swa:
        native_swa_fields(str(text_config.model_type), HybridConfig(num_layers, num_kv_heads),
                          native_layers=native)  # fail early
    if native and len(native) == num_layers:
        raise LightTransferError(f"every layer of '{model_id}' already slides its own window of "
                                 f"{own_window} tokens; there is nothing to convert.")
    if native:
        if layers is not None and set(layers) & set(native):
            raise LightTransferError(
                f"--layers {','.join(map(str, sorted(set(layers) & set(native))))}: these layers already slide the "
                f"model's own window of {own_window} tokens; pick full-attention "
                "layers."
            )
        # already bounded by the architecture: never candidates, and the runtime keeps their own window
        keep = sorted(set(keep) | set(native))
        warnings.append(f"{len(native)} of {num_layers} layers already slide the model's own window of "
                        f"{own_window} tokens; they stay as they are, and --ratio "
                        f"is a share of the other {num_layers - len(native)}.")

    report = _load_report(report)
    if calib and (report is not None or layers is not None):
        warnings.append("--calib is ignored: the layers come from " + ("--layers." if layers is not None else "the report."))
    needs_analysis = report is None and layers is None and strategy != "random"
    if needs_analysis:
        _check_analysis_options(calib=calib, seq_len=seq_len, samples=samples, sink=sink, window=window)
    gguf_dtype = "float32" if dtype == "auto" else dtype
    if loaded is None and source.kind == "gguf":
        # weights are written from this copy, so it stays in float32 on the CPU (the dequantized values)
        loaded = load_model(source, device="cpu", dtype=gguf_dtype, trust_remote_code=trust_remote_code,
                            with_tokenizer=True)
    elif loaded is None and needs_analysis:
        loaded = load_model(source, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    fingerprint = loaded.fingerprint if loaded else fingerprint_from_config(config)
    if report is not None:
        _check_report(report, fingerprint=fingerprint, model_id=model_id, num_layers=num_layers,
                      num_kv_heads=num_kv_heads, sink=sink, window=window, warnings=warnings)

    with staged_directory(out, force=force) as tmp:
        written = _write_weights(source, loaded, tmp)
        if needs_analysis:
            report = _run_analysis(loaded, calib=calib, seq_len=seq_len, samples=samples, sink=sink, window=window,
                                   seed=seed, device=device, dtype=dtype, progress=progress)
        hybrid, rows = _select(report, num_layers=num_layers, num_kv_heads=num_kv_heads, ratio=ratio,
                               layers=layers, keep=keep, granularity=granularity, strategy=strategy, seed=seed,
                               sink=sink, window=window, prefill=prefill, native_swa=native_swa, native=native,
                               source={"model_id": model_id, "fingerprint": fingerprint,
                                       "format": source.kind})
        if not hybrid.streaming_kv_heads:
            warnings.append(f"ratio {ratio} streams no layer of {num_layers}; the checkpoint is the dense model.")
        if report is not None and layers is None and strategy == "lazy":
            _warn_ties(report, hybrid, granularity=granularity, warnings=warnings)

        config_dict = json.loads((source.path / "config.json").read_text()) if source.kind == "directory" \
            else json.loads((tmp / "config.json").read_text())
        config_dict[CONFIG_KEY] = hybrid.to_dict()
        if native_swa:
            config_dict.update(native_swa_fields(str(text_config.model_type), hybrid, native_layers=native))
            warnings.append(NATIVE_SWA_WARNING)
            if hybrid.head_masks:
                warnings.append("--native-swa marks whole layers only; layers with some streaming KV heads stay "
                                "full attention for stock loaders.")
        _write_json(tmp / "config.json", config_dict)
        if report is not None and hybrid.sidecar:
            _write_json(tmp / SIDECAR_NAME, _sidecar(report, model_id=model_id, fingerprint=fingerprint))

        gguf_metadata = _write_aux_files(source, loaded, tmp, trust_remote_code=trust_remote_code)
        memory = _memory(hybrid, text_config, config_dict)
        _write_card(tmp, out.name, hybrid, rows, memory, report, written, source=source, gguf_dtype=gguf_dtype,
                    hub_id=hub_id, license_id=gguf_metadata.get("general.license"))
        checked = verify_weights(tmp, written)
        log.info("checked %d tensors against the source", checked)

    for line in warnings:
        log.warning(line)
    return ConvertResult(out=out, hybrid=hybrid, rows=rows, memory=memory, weights=written.method,
                         tensors_verified=checked, warnings=warnings)


def _write_weights(source: ModelSource, loaded: LoadedModel | None, tmp: Path) -> WrittenWeights:
    if source.kind == "gguf":
        assert loaded is not None
        written = write_model_weights(loaded.model, tmp)
        written.method = f"dequantized from the GGUF file {source.path.name} and saved in " \
                         f"{str(loaded.model.dtype).removeprefix('torch.')}"
        return written
    fmt, shards, index = source_weight_files(source.path)
    if fmt == "safetensors":
        return write_safetensors_shards(source.path, tmp, shards, index)
    return write_bin_as_safetensors(source.path, tmp, shards)


def _check_analysis_options(*, calib, seq_len, samples, sink, window) -> None:
    """The analysis' own one-line errors, before any model is loaded."""
    from ..analysis.pipeline import check_params
    from ..calibration import check_sources

    check_params(seq_len=seq_len, samples=samples, batch=1, sink=sink, recent=window, last=32, threshold=0.1)
    check_sources([str(c) for c in calib] if isinstance(calib, (list, tuple)) else
                  (str(calib) if calib is not None else None))


def _run_analysis(loaded: LoadedModel, *, calib, seq_len, samples, sink, window, seed, device, dtype, progress):
    from ..analysis.pipeline import analyze
    from ..loading import resolve_device, resolve_dtype

    dev = resolve_device(device)
    loaded.model.to(device=dev, dtype=resolve_dtype(dtype, dev))
    log.info("analysing %s (sink %d, window %d, %d x %d tokens)", loaded.model_id, sink, window, samples, seq_len)
    if calib is not None and not isinstance(calib, (str, os.PathLike)):
        calib = [str(c) for c in calib]
    elif calib is not None:
        calib = str(calib)
    return analyze(loaded, calib=calib, seq_len=seq_len, samples=samples, sink=sink, recent=window, seed=seed,
                   device=device, dtype=dtype, progress=progress, tokenizer=loaded.tokenizer)


def _warn_ties(report, hybrid: HybridConfig, *, granularity: str, warnings: list[str]) -> None:
    """Say when equal scores, not the ranking, decided part of the cut (optimized gates often sit at exactly 0)."""
    from .selection import tied_at_cut

    if granularity == "head":
        scores = [x for row in report.kv_head_long_context_scores() for x in row]
        width = hybrid.num_kv_heads
        chosen = [layer * width + h for layer in range(hybrid.num_layers) for h in range(width)
                  if layer in hybrid.streaming_layers or hybrid.head_masks.get(layer, [False] * width)[h]]
        what = "KV heads"
    else:
        scores, chosen, what = list(report.layer_streaming_scores()), list(hybrid.streaming_layers), "layers"
    ties = tied_at_cut(scores, chosen)
    if ties:
        hint = ("lower --gate-l1 in 'lighttransfer analyze --method optimize' for a finer ranking"
                if report.head_score_method == "optimize" else "more calibration samples may separate them")
        warnings.append(f"{ties} of the streaming {what} tie on score with ones kept full, so the lower index "
                        f"decided them; {hint}.")


def _ranking_score(report, layer_scores) -> dict[str, Any]:
    """The layer score that ranked the selection, for the table, when it is not the lazy ratio."""
    if report is None or getattr(report, "head_score_method", "attention") != "optimize" or layer_scores is None:
        return {}
    return {"scores": layer_scores, "score_label": "1 - max gate"}


def _select(report, *, num_layers, num_kv_heads, ratio, layers, keep, granularity, strategy, seed, sink, window,
            prefill, native_swa, source, native=()) -> tuple[HybridConfig, list[SelectionRow]]:
    lazy = list(report.layer_lazy_ratios()) if report is not None else None
    # what ranks the layers: the lazy ratio, or the optimized gates when the report's method says so
    layer_scores = list(report.layer_streaming_scores()) if report is not None else None
    head_masks: dict[int, list[bool]] = {}
    # with natively sliding layers the ratio is a share of the model's full-attention layers, the only ones a
    # conversion can bound further (Gemma 3 270M: ratio 0.5 streams 2 of its 3 global layers, not all of them)
    share = ratio * (num_layers - len(native)) / num_layers if native else ratio
    if granularity == "head":
        scores = report.kv_head_long_context_scores() if report is not None else [[0.0] * num_kv_heads] * num_layers
        streaming, head_masks = split_head_masks(
            select_kv_heads(scores, ratio=share, keep_layers=keep, strategy=strategy, seed=seed))
    else:
        streaming = select_layers(layer_scores if layer_scores is not None else [0.0] * num_layers, ratio=share,
                                  keep=keep, layers=layers, strategy=strategy, seed=seed)
    calibration = {}
    summary: dict[str, Any] = {}
    if report is not None:
        calibration = dict(report.params or {})
        if getattr(report, "calibration", None):
            # scalars and source names only; per-sample offsets stay in the report
            calibration["text"] = {k: v for k, v in report.calibration.items()
                                   if not isinstance(v, (list, dict)) or k in ("sources", "files")}
        summary = dict(report.summary())
    summary["selection"] = {"ratio": None if layers is not None else ratio, "strategy": "manual" if layers is not None else strategy,
                            "keep": list(keep), "seed": seed,
                            "score": report.head_score_method if report is not None else None}
    hybrid = HybridConfig(
        num_layers=num_layers, num_kv_heads=num_kv_heads, streaming_layers=streaming, head_masks=head_masks,
        sink=sink, window=window, prefill=prefill, granularity=granularity, source=source,
        calibration=calibration, report_summary=summary, sidecar=SIDECAR_NAME if report is not None else None,
        native_swa=native_swa,
    )
    rows = explain_selection(num_layers=num_layers, num_kv_heads=num_kv_heads, streaming_layers=hybrid.streaming_layers,
                             head_masks=hybrid.head_masks, lazy_ratios=lazy, keep=keep, manual=layers is not None,
                             strategy=strategy, native=native, **_ranking_score(report, layer_scores))
    return hybrid, rows


def _write_aux_files(source: ModelSource, loaded: LoadedModel | None, tmp: Path, *,
                     trust_remote_code: bool) -> dict[str, Any]:
    """Copy tokenizer, generation and license files; for a GGUF, save its tokenizer. Returns GGUF metadata."""
    if source.kind == "directory":
        _copy_aux_files(source.path, tmp, AUX_PATTERNS + LICENSE_PATTERNS)
        return {}
    # GGUF: the tokenizer lives inside the file; transformers' loader rebuilds it, minus a few roles
    tokenizer = loaded.tokenizer if loaded is not None else None
    if tokenizer is None:
        from ..loading import load_tokenizer

        tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    metadata = read_gguf_metadata(source.path)  # license and name for the card; load_tokenizer filled the roles
    tokenizer.save_pretrained(tmp)
    _copy_aux_files(source.path.parent, tmp, LICENSE_PATTERNS)
    return metadata


def _memory(hybrid: HybridConfig, text_config, config_dict: dict[str, Any]) -> list[KVMemoryRow]:
    """KV-cache sizes at 8k/32k/128k tokens in the dtype of the written weights."""
    heads = int(text_config.num_attention_heads)
    head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // heads)
    dtype = str(config_dict.get("dtype") or config_dict.get("torch_dtype") or "float32").removeprefix("torch.")
    return kv_memory_table(hybrid, head_dim=head_dim, dtype_bytes=DTYPE_BYTES.get(dtype, 4),
                           native_windows=native_sliding_windows(text_config))


def _write_card(tmp: Path, name: str, hybrid: HybridConfig, rows, memory, report, written: WrittenWeights, *,
                source: ModelSource, gguf_dtype: str, hub_id: str | None, license_id: str | None) -> None:
    kv_scores = report.kv_head_long_context_scores() if report is not None and hybrid.granularity == "head" else None
    figure = FIGURE_NAME if plot_selection(tmp / FIGURE_NAME, rows=rows, hybrid=hybrid, kv_scores=kv_scores) else None
    heatmap = None
    if report is not None and hasattr(report, "query_heads"):
        try:
            from ..analysis.heatmap import plot_heatmap

            plot_heatmap(report, tmp / HEATMAP_NAME, lazy_fraction=len(hybrid.streaming_layers) / hybrid.num_layers)
            heatmap = HEATMAP_NAME
        except ImportError as exc:  # pragma: no cover - matplotlib is a dependency
            log.warning("no heatmap in the model card (%s)", exc)
    dtype_note = None
    if source.kind == "gguf":
        dtype_note = (f"The source was a GGUF file ({source.path.name}); its quantized weights were dequantized "
                      f"by transformers and saved in {gguf_dtype}. They equal the GGUF's values, not the original "
                      "full-precision weights.")
    card = render_model_card(name=name, hybrid=hybrid, rows=rows, memory=memory, weights_note=written.method,
                             figure=figure, heatmap=heatmap, hub_id=hub_id, license_id=license_id,
                             dtype_note=dtype_note)
    (tmp / "README.md").write_text(card)


__all__ = ["convert", "ConvertResult", "fingerprint_from_config"]
