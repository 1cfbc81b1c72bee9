"""``convert``: write a hybrid checkpoint whose laziest layers (or KV heads) use streaming attention.

The steps: plan (:mod:`.plan`: options, report, which layers or KV heads stream), write (:mod:`.writer`:
weights, config, sidecar, tokenizer and license files, model card), verify. The output is a complete
transformers model directory: the source's tensors unchanged in safetensors, the
source's ``config.json`` plus the ``lighttransfer`` block (:class:`HybridConfig`), the per-head scores in a
sidecar, tokenizer/generation/license files, and a model card. It is built in a temp directory beside the
target and renamed into place only after every tensor was read back and checked.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import architecture
from ..architecture import check_window_fits, native_sliding_layers, native_sliding_windows
from ..errors import LightTransferError
from ..hybrid_format import (
    CONFIG_KEY,
    DTYPE_BYTES,
    SIDECAR_NAME,
    HybridConfig,
    KVMemoryRow,
    kv_memory_table,
    sparse_prefill_config,
    token_select_config,
)
from ..loading import (
    LoadedModel,
    check_weight_files,
    fingerprint_from_config,
    load_config,
    load_model,
    local_snapshot,
    resolve_model_source,
)
from .native_swa import NATIVE_SWA_WARNING, native_swa_fields
from .plan import check_options, check_report, load_report, plan_hybrid, warn_ties
from .selection import SelectionRow, check_layer_indices
from .staging import check_target, staged_directory
from .weights import verify_weights
from .writer import sidecar, write_aux_files, write_card, write_json, write_weights

log = logging.getLogger(__name__)


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
    seq_len: int | None = None,
    samples: int = 8,
    status: Callable[[str], None] | None = None,
    decode: str = "dense",
    select_k: int | None = None,
    select_init: int | None = None,
    select_local: int | None = None,
    select_reuse: float | None = None,
    select_reuse_max_age: int | None = None,
    select_reuse_against: str | None = None,
    prefill_sparse: str | None = None,
    prefill_alpha: float | None = None,
    prefill_min_len: int | None = None,
    head_routing=None,
    routing_full_share: float | None = None,
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
        window: most window tokens every streaming query keeps, its own included (>= 1).
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
        seq_len, samples: calibration windows of the one-step analysis (tokens per sample, number of samples);
            ``seq_len`` defaults to 4096 or the model's positions, whichever is fewer.
        status: called with a short line before each slow step (dequantizing a GGUF file, the analysis,
            writing and checking the weights), so that a terminal is never silent for long.
        decode: how the runtime decodes the full layers, stored in the block: ``dense`` or ``tokenselect``
            (TokenSelect, arXiv 2411.02886; block format 2).
        select_k, select_init, select_local, select_reuse, select_reuse_max_age, select_reuse_against: TokenSelect's
            settings (defaults 2048, 128, 512, 0.9, 64, ``anchor``; ``select_reuse_max_age``: steps a reused
            selection may serve; ``select_reuse_against``: what the Selection Cache compares each query with, the
            selection's ``anchor`` query or the ``previous`` one).
        prefill_sparse: block-sparse prefill of the full layers stored in the block (its optional
            ``sparse_prefill`` entry): ``sample``, ``vslash`` or ``antidiag``; ``None``/``"dense"`` writes none.
        prefill_alpha, prefill_min_len: its mass share kept and key threshold (defaults 0.95 and 16384).
        head_routing: a :class:`~lighttransfer.hybrid_format.HeadRoutingConfig` stored in the block (the full
            layers' per-query KV-head routing at decode), or ``None``.
        routing_full_share: with a ``qada`` ``head_routing``: its heads guard, the share in (0, 1] of the full
            layers' KV heads that always stay full, those with the highest long-context scores of the report (its
            gates when it has them); needs ``report``, or the analysis run here.

    Raises:
        LightTransferError: bad options, an existing ``out`` without ``force``, a report for another model,
            a full disk, or a written tensor that does not match the source.
    """
    layers = None if layers is None else list(layers)
    check_options(ratio=ratio, sink=sink, window=window, granularity=granularity, strategy=strategy,
                   prefill=prefill, layers=layers)
    _check_whole(seed=seed, samples=samples, **({} if seq_len is None else {"seq_len": seq_len}))
    selection = token_select_config(decode, select_k=select_k, select_init=select_init, select_local=select_local,
                                    select_reuse=select_reuse, select_reuse_max_age=select_reuse_max_age,
                                    select_reuse_against=select_reuse_against, option="--decode")
    sparse_prefill = sparse_prefill_config(prefill_sparse, alpha=prefill_alpha, min_len=prefill_min_len,
                                           option="--prefill-sparse")
    say = status or (lambda line: log.info("%s", line))
    out = Path(out).expanduser()
    check_target(out.absolute(), force=force)
    keep = list(keep)
    warnings: list[str] = []

    loaded = model if isinstance(model, LoadedModel) else None
    given = loaded.source if loaded else resolve_model_source(model)
    model_id, hub_id = given.model_id, given.spec if given.kind == "hub" else None
    source = local_snapshot(given)
    if source.path is not None and out.absolute().resolve() in (source.path, source.path.parent if
                                                                source.kind == "gguf" else None):
        raise LightTransferError(f"--out '{out}' is where the source model lives; choose another directory.")
    config = loaded.model.config if loaded else load_config(source, trust_remote_code=trust_remote_code)
    text_config = architecture.text_config(config)
    shape = architecture.model_shape(config, source=f"'{model_id}'")
    num_layers, num_kv_heads = shape.num_layers, shape.num_kv_heads
    check_window_fits(text_config, sink=sink, window=window)
    _refuse_reordered_heads(config, model_id)
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, shape.max_positions or DEFAULT_SEQ_LEN)
    if loaded is None and source.kind == "directory":
        check_weight_files(source, config)  # the weights are copied, maybe never loaded: check them here
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

    if routing_full_share is not None:
        if head_routing is None or head_routing.mode != "qada":
            raise LightTransferError("--routing-full-share (the heads guard) needs --head-routing qada.", exit_code=2)
        if isinstance(routing_full_share, bool) or not 0.0 < float(routing_full_share) <= 1.0:
            raise LightTransferError(f"--routing-full-share must be in (0, 1], got {routing_full_share!r}.",
                                     exit_code=2)
        if report is None and (layers is not None or strategy == "random"):
            raise LightTransferError("--routing-full-share picks the always-full KV heads from the analysis; pass "
                                     "--report (with --layers or --strategy random none runs).", exit_code=2)
    report = load_report(report)
    if calib and (report is not None or layers is not None):
        warnings.append("--calib is ignored: the layers come from " + ("--layers." if layers is not None else "the report."))
    needs_analysis = report is None and layers is None and strategy != "random"
    if needs_analysis:
        _check_analysis_options(calib=calib, seq_len=seq_len, samples=samples, sink=sink, window=window,
                                max_positions=shape.max_positions)
    gguf_dtype = "float32" if dtype == "auto" else dtype
    if loaded is None and source.kind == "gguf":
        # weights are written from this copy, so it stays in float32 on the CPU (the dequantized values)
        say(f"dequantizing {source.path.name} to {gguf_dtype} (transformers' GGUF reader; this can take a minute)")
        loaded = load_model(source, device="cpu", dtype=gguf_dtype, trust_remote_code=trust_remote_code,
                            with_tokenizer=True)
    elif loaded is None and needs_analysis:
        say(f"loading {model_id}")
        loaded = load_model(source, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    fingerprint = loaded.fingerprint if loaded else fingerprint_from_config(config, source)
    if report is not None:
        check_report(report, fingerprint=fingerprint, model_id=model_id, num_layers=num_layers,
                      num_kv_heads=num_kv_heads, sink=sink, window=window, warnings=warnings)

    with staged_directory(out, force=force) as tmp:
        say("writing the weights")
        written = write_weights(source, loaded, tmp)
        if needs_analysis:
            say(f"analysing {samples} x {seq_len} tokens to choose the layers")
            report = _run_analysis(loaded, calib=calib, seq_len=seq_len, samples=samples, sink=sink, window=window,
                                   seed=seed, device=device, dtype=dtype, progress=progress)
        hybrid, rows = plan_hybrid(report, num_layers=num_layers, num_kv_heads=num_kv_heads, ratio=ratio,
                               layers=layers, keep=keep, granularity=granularity, strategy=strategy, seed=seed,
                               sink=sink, window=window, prefill=prefill, native_swa=native_swa, native=native,
                               source={"model_id": model_id, "fingerprint": fingerprint,
                                       "format": source.kind})
        hybrid = hybrid.with_selection(selection)
        if sparse_prefill is not None:
            hybrid = replace(hybrid, sparse_prefill=sparse_prefill.to_dict())
        if routing_full_share is not None:
            head_routing = _heads_guard(head_routing, report, hybrid, share=routing_full_share)
        if head_routing is not None:
            hybrid = replace(hybrid, head_routing=head_routing.to_dict())
        if not hybrid.streaming_kv_heads:
            warnings.append(f"ratio {ratio} streams no layer of {num_layers}; the checkpoint is the dense model"
                            + (" with TokenSelect decoding." if selection else "."))
        if report is not None and layers is None and strategy == "lazy":
            warn_ties(report, hybrid, granularity=granularity, warnings=warnings)

        config_dict = json.loads((source.path / "config.json").read_text()) if source.kind == "directory" \
            else json.loads((tmp / "config.json").read_text())
        config_dict[CONFIG_KEY] = hybrid.to_dict()
        if native_swa:
            config_dict.update(native_swa_fields(str(text_config.model_type), hybrid, native_layers=native))
            warnings.append(NATIVE_SWA_WARNING)
            if hybrid.head_masks:
                warnings.append("--native-swa marks whole layers only; layers with some streaming KV heads stay "
                                "full attention for stock loaders.")
        write_json(tmp / "config.json", config_dict)
        if report is not None and hybrid.sidecar:
            write_json(tmp / SIDECAR_NAME, sidecar(report, model_id=model_id, fingerprint=fingerprint))

        gguf_metadata = write_aux_files(source, loaded, tmp, trust_remote_code=trust_remote_code)
        memory = _memory(hybrid, text_config, config_dict)
        write_card(tmp, out.name, hybrid, rows, memory, report, written, source=source, gguf_dtype=gguf_dtype,
                    hub_id=hub_id, license_id=gguf_metadata.get("general.license"))
        say("checking the written tensors against the source")
        checked = verify_weights(tmp, written)
        log.info("checked %d tensors against the source", checked)

    for line in warnings:
        log.warning(line)
    return ConvertResult(out=out, hybrid=hybrid, rows=rows, memory=memory, weights=written.method,
                         tensors_verified=checked, warnings=warnings)


DEFAULT_SEQ_LEN = 4096


def _check_whole(**values) -> None:
    """Whole-number options given as strings, floats or bools through the Python API: one line, not a crash."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise LightTransferError(f"{name}={value!r}: pass a whole number (an int), e.g. {name}=8.")


def _refuse_reordered_heads(config, model_id: str) -> None:
    """A model saved from a loaded head-level hybrid has its KV heads reordered in the weights (the block's
    ``head_order``): reports and head indices of the original model no longer fit it."""
    try:
        block = HybridConfig.from_model_config(config)
    except LightTransferError:
        return  # a damaged block is replaced by the new one
    if block is not None and block.head_order:
        raise LightTransferError(
            f"'{model_id}' was saved from a loaded head-level hybrid: the KV heads of layers "
            f"{','.join(map(str, sorted(block.head_order)))} are reordered in its weights (config.json's "
            "lighttransfer.head_order), so head indices and reports of the original model do not fit it. "
            "Convert the original model instead."
        )


def _check_analysis_options(*, calib, seq_len, samples, sink, window, max_positions=None) -> None:
    """The analysis' own one-line errors, before any model is loaded."""
    from ..analysis.pipeline import check_params
    from ..calibration import check_sources

    check_params(seq_len=seq_len, samples=samples, batch=1, sink=sink, window=window, last=32, threshold=0.1,
                 max_positions=max_positions)
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
    return analyze(loaded, calib=calib, seq_len=seq_len, samples=samples, sink=sink, window=window, seed=seed,
                   device=device, dtype=dtype, progress=progress, tokenizer=loaded.tokenizer)


def _memory(hybrid: HybridConfig, text_config, config_dict: dict[str, Any]) -> list[KVMemoryRow]:
    """KV-cache sizes at 8k/32k/128k tokens in the dtype of the written weights."""
    head_dim = architecture.model_shape(text_config).head_dim
    dtype = str(config_dict.get("dtype") or config_dict.get("torch_dtype") or "float32").removeprefix("torch.")
    return kv_memory_table(hybrid, head_dim=head_dim, dtype_bytes=DTYPE_BYTES.get(dtype, 4),
                           native_windows=native_sliding_windows(text_config))


def _heads_guard(routing, report, hybrid, *, share: float):
    """``routing`` with the heads guard: the full layers' KV heads that
    :func:`~.selection.select_full_kv_heads` picks from ``report``'s long-context scores always full."""
    from ..hybrid_format import HeadRoutingConfig
    from .selection import select_full_kv_heads

    full_layers = [layer for layer in range(hybrid.num_layers) if not any(hybrid.kv_head_mask(layer))]
    if not full_layers:
        raise LightTransferError("--routing-full-share keeps no KV head full: no layer stays full.", exit_code=2)
    masks = select_full_kv_heads(report.kv_head_long_context_scores(), share=share, layers=full_layers)
    d = dict(routing.to_dict(), guard="heads", full_masks=masks)
    d.pop("page", None)
    return HeadRoutingConfig.from_dict(d)


__all__ = ["convert", "ConvertResult", "fingerprint_from_config"]
