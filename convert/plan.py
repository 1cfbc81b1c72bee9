"""Planning a conversion: which layers (or KV heads) stream, checked against the options and the report.

Pure decisions, no file is written here (:mod:`.writer` writes). The one rule that several stages share lives
here too: with a model that slides its own window on some layers, ``--ratio`` is a share of the *other* layers,
the only ones a conversion can bound further (:func:`share_of_all_layers`, :func:`pick_layers`); the evaluation
rows and the benchmark pick their layers with the same functions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..errors import LightTransferError
from ..hybrid_format import SIDECAR_NAME, HybridConfig
from .selection import (
    STRATEGIES,
    SelectionRow,
    check_ratio,
    explain_selection,
    select_kv_heads,
    select_layers,
    split_head_masks,
    tied_at_cut,
)


def share_of_all_layers(ratio: float, *, num_layers: int, native: Sequence[int] = ()) -> float:
    """The share of *all* layers that ``ratio`` of the full-attention layers is (the model's own sliding layers,
    ``native``, never stream): Gemma 3 270M at ratio 0.5 streams 2 of its 3 global layers, not 9 of 18."""
    return ratio * (num_layers - len(native)) / num_layers if native and num_layers else ratio


def pick_layers(scores: Sequence[float], *, ratio: float, strategy: str = "lazy", seed: int = 0,
                exclude: Sequence[int] = ()) -> list[int]:
    """The ``round(ratio * len(scores))`` layers a conversion streams by ``strategy`` (``lazy``: highest score
    first, ``least_lazy``, ``random``), never one of ``exclude`` (the model's own sliding layers)."""
    return sorted(int(i) for i in select_layers(list(scores), ratio=ratio, strategy=strategy, seed=seed,
                                                keep=exclude))


def check_options(*, ratio, sink, window, granularity, strategy, prefill, layers) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise LightTransferError(f"ratio={ratio!r}: pass a number in (0, 1], e.g. 0.5.")
    check_ratio(ratio)
    if isinstance(window, bool) or isinstance(sink, bool):
        raise LightTransferError(f"sink={sink!r}, window={window!r}: pass whole numbers of tokens, not True/False.")
    if layers is not None and any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
        raise LightTransferError(f"layers={list(layers)!r}: pass layer indices as ints, e.g. layers=[3, 5].")
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




def load_report(report):
    if report is None or not isinstance(report, (str, os.PathLike)):
        return report
    from ..analysis.report import AnalysisReport

    return AnalysisReport.load(report)


def check_report(report, *, fingerprint: str, model_id: str, num_layers: int, num_kv_heads: int,
                  sink: int, window: int, warnings: list[str]) -> None:
    from ..loading import compare_fingerprints

    match = compare_fingerprints(report.fingerprint, fingerprint)
    if match == "different":
        raise LightTransferError(
            f"the report was made for model '{report.model_id}' (fingerprint {report.fingerprint}), not for "
            f"'{model_id}' (fingerprint {fingerprint}): another model, or the same shape with other weights (a "
            "base model and its fine-tune); run `lighttransfer analyze` on this model, or pass the model the "
            "report belongs to."
        )
    if match == "legacy":
        warnings.append(
            f"the report predates weight fingerprints: it matches the shape of '{model_id}', but lighttransfer "
            "cannot tell whether it was made on these weights; rerun `lighttransfer analyze` to be sure."
        )
    if report.num_layers != num_layers or report.num_kv_heads != num_kv_heads:
        raise LightTransferError(
            f"the report describes {report.num_layers} layers x {report.num_kv_heads} KV heads, the model has "
            f"{num_layers} x {num_kv_heads}; the report is for another model."
        )
    params = dict(report.params or {})
    measured_window = params.get("window", params.get("recent", window))  # reports before 0.2 said recent
    if params.get("sink", sink) != sink or measured_window != window:
        warnings.append(
            f"the report measured lazy ratios with sink {params.get('sink')} and window {measured_window}, "
            f"but the hybrid will use sink {sink} and window {window}; the layer choice may not fit. "
            "Rerun the analysis with the same --sink and --window."
        )


def warn_ties(report, hybrid: HybridConfig, *, granularity: str, warnings: list[str]) -> None:
    """Say when equal scores, not the ranking, decided part of the cut (optimized gates often sit at exactly 0)."""
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


def ranking_score(report, layer_scores) -> dict[str, Any]:
    """The layer score that ranked the selection, for the table, when it is not the lazy ratio."""
    if report is None or getattr(report, "head_score_method", "attention") != "optimize" or layer_scores is None:
        return {}
    return {"scores": layer_scores, "score_label": "1 - max gate"}


def plan_hybrid(report, *, num_layers, num_kv_heads, ratio, layers, keep, granularity, strategy, seed, sink, window,
            prefill, native_swa, source, native=()) -> tuple[HybridConfig, list[SelectionRow]]:
    lazy = list(report.layer_lazy_ratios()) if report is not None else None
    # what ranks the layers: the lazy ratio, or the optimized gates when the report's method says so
    layer_scores = list(report.layer_streaming_scores()) if report is not None else None
    head_masks: dict[int, list[bool]] = {}
    # with natively sliding layers the ratio is a share of the model's full-attention layers, the only ones a
    # conversion can bound further (Gemma 3 270M: ratio 0.5 streams 2 of its 3 global layers, not all of them)
    share = share_of_all_layers(ratio, num_layers=num_layers, native=native)
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
                             strategy=strategy, native=native, **ranking_score(report, layer_scores))
    return hybrid, rows


__all__ = ["check_options", "load_report", "check_report", "plan_hybrid", "warn_ties", "share_of_all_layers",
           "pick_layers"]
