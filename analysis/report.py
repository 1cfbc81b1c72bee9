"""The analysis report: per-layer lazy ratios and per-head long-context scores of one model, as JSON.

Written by ``lighttransfer analyze`` (and :func:`lighttransfer.analysis.analyze`), read by ``convert`` to pick
the streaming layers (or KV heads). Plain Python and JSON only (no torch), so reading a report is cheap.

Shapes in the JSON: per-layer lists have ``num_layers`` entries; head matrices are ``[num_layers][num_heads]``
(query heads) or ``[num_layers][num_kv_heads]`` (KV heads); all ratios are fractions in [0, 1].
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import LightTransferError

SCHEMA_VERSION = 1
HEAD_METRICS = ("lazy_ratio", "lazy_ratio_std", "long_context_mass", "long_query_share")


@dataclass
class SummaryStat:
    """Mean, standard deviation (population, over samples), min and max of one quantity."""

    mean: float
    std: float
    min: float
    max: float


@dataclass
class LayerStats:
    """One decoder layer: its lazy ratio (query heads and last queries averaged) over samples."""

    layer: int
    lazy_ratio: SummaryStat
    per_sample: list[float]


@dataclass
class HeadStats:
    """Per-head matrices ``[num_layers][heads]``, averaged over samples.

    Attributes:
        lazy_ratio: mean lazy mass of the head's last queries (Eq. 1 per head).
        lazy_ratio_std: its standard deviation over samples.
        long_context_mass: attention mass beyond sink + window, ``1 - lazy_ratio``.
        long_query_share: share of the last queries whose mass beyond sink + window exceeds ``threshold``.
    """

    lazy_ratio: list[list[float]]
    lazy_ratio_std: list[list[float]]
    long_context_mass: list[list[float]]
    long_query_share: list[list[float]]


def layer_scores_from_gates(gates) -> list[float]:
    """``[num_layers]`` streaming scores from DuoAttention-style KV-head gates ``[num_layers][num_kv_heads]`` (1 =
    the head needs full attention, 0 = sink + window suffices): ``1 - max`` over the layer's KV heads, so a layer
    ranks as safe to stream only when none of its heads needs the far past. Same direction as a lazy ratio
    (higher = stream first)."""
    return [1.0 - max(float(g) for g in row) for row in gates]


@dataclass
class AnalysisReport:
    """Result of one analysis run (see the module docstring for shapes).

    Attributes:
        schema_version: version of this layout (:data:`SCHEMA_VERSION`).
        model_id: what the model was called (hub id, directory or file name).
        fingerprint: :func:`lighttransfer.loading.model_fingerprint` of the analysed model.
        num_layers, num_heads, num_kv_heads: the model's attention shape.
        params: sink, window, last, threshold, seq_len, samples, batch, seed, dtype, device,
            attn_implementation, block_size.
        calibration: sources, files, ``text_sha256``, ``tokens_sha256``, token counts, offsets.
        layers: per-layer lazy ratio statistics over samples.
        query_heads: per query head (``[num_layers][num_heads]``).
        kv_heads: per KV head (``[num_layers][num_kv_heads]``), formed from the KV head's group of query
            heads so that a KV head looks only as lazy as its least lazy query head: ``lazy_ratio`` is the min
            over the group, ``long_context_mass`` and ``long_query_share`` the max.
        ranking: layer indices from most to least lazy (ties: lower index first).
        timings: seconds (``load``, ``calibration``, ``analysis``, ``per_sample``) and ``tokens_per_s``.
        peak_extra_memory_bytes: the most memory the statistics held at once beyond the forward pass itself.
        environment: versions of lighttransfer, torch and transformers, and the device name.
        kv_head_gates: optional ``[num_layers][num_kv_heads]`` gates in [0, 1] from ``analyze --method
            optimize`` (DuoAttention-style optimization, :mod:`lighttransfer.analysis.head_gates`).
        head_score_method: which KV-head score convert uses by default: ``attention`` (long-context mass)
            or ``optimize`` (the gates).
    """

    model_id: str
    fingerprint: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    params: dict[str, Any]
    calibration: dict[str, Any]
    layers: list[LayerStats]
    query_heads: HeadStats
    kv_heads: HeadStats
    ranking: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    peak_extra_memory_bytes: int = 0
    environment: dict[str, Any] = field(default_factory=dict)
    kv_head_gates: list[list[float]] | None = None
    head_score_method: str = "attention"
    schema_version: int = SCHEMA_VERSION

    # ---- views ------------------------------------------------------------------------------------------
    def layer_lazy_ratios(self) -> list[float]:
        """``[num_layers]`` mean lazy ratio of each layer (higher = lazier = safer to stream)."""
        return [s.lazy_ratio.mean for s in self.layers]

    def layer_streaming_scores(self, method: str | None = None) -> list[float]:
        """``[num_layers]`` score that ranks layers for streaming (higher = stream first).

        ``method="attention"``: the lazy ratio (LightTransfer's rule). ``method="optimize"``: ``1 - max`` of the
        layer's optimized KV-head gates (a layer streams first when none of its heads needs the far past).
        ``None``: :attr:`head_score_method`, so a report from ``analyze --method optimize`` ranks layers by its
        gates too.
        """
        method = method or self.head_score_method
        if method == "optimize":
            return layer_scores_from_gates(self.kv_head_long_context_scores("optimize"))
        if method != "attention":
            raise LightTransferError(f"layer score method '{method}' is not known; use attention or optimize.")
        return self.layer_lazy_ratios()

    def head_lazy_ratios(self) -> list[list[float]]:
        """``[num_layers][num_heads]`` mean lazy ratio of each query head."""
        return [list(row) for row in self.query_heads.lazy_ratio]

    def kv_head_long_context_scores(self, method: str | None = None) -> list[list[float]]:
        """``[num_layers][num_kv_heads]``: higher = the KV head's queries reach further back.

        ``method="attention"``: the *max* over the KV head's GQA group of the query heads' long-context mass
        (mass beyond sink + window, averaged over the last queries and samples): a KV head may stream only if
        every query head reading it allows it. ``method="optimize"``: the optimized gates
        (:attr:`kv_head_gates`). ``None``: :attr:`head_score_method`.
        """
        method = method or self.head_score_method
        if method == "optimize":
            if self.kv_head_gates is None:
                raise LightTransferError("this report has no KV-head gates; rerun 'lighttransfer analyze "
                                         "--method optimize' or use the attention scores.")
            return [list(row) for row in self.kv_head_gates]
        if method != "attention":
            raise LightTransferError(f"KV-head score method '{method}' is not known; use attention or optimize.")
        return [list(row) for row in self.kv_heads.long_context_mass]

    def summary(self) -> dict[str, Any]:
        """A small dict for a checkpoint's config.json: per-layer mean lazy ratios (4 decimals), ranking,
        parameters and where the report came from."""
        return {
            "schema_version": self.schema_version,
            "model_id": self.model_id,
            "fingerprint": self.fingerprint,
            "layer_lazy_ratios": [round(x, 4) for x in self.layer_lazy_ratios()],
            "ranking": list(self.ranking),
            "params": {k: self.params[k] for k in sorted(self.params)
                       if k in ("sink", "window", "last", "threshold", "seq_len", "samples", "seed")},
            "calibration_sha256": self.calibration.get("text_sha256"),
        }

    # ---- (de)serialization -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), sort_keys=True))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, origin: str = "report") -> AnalysisReport:
        """Build and validate a report from its JSON dict; one-line errors name ``origin``."""
        if not isinstance(data, dict):
            raise LightTransferError(f"{origin} is not an analysis report (expected a JSON object).")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise LightTransferError(
                f"{origin} has schema_version {version!r}; this lighttransfer reads version {SCHEMA_VERSION}: "
                "rerun 'lighttransfer analyze' to write a new report."
            )
        params = data.get("params")
        if isinstance(params, dict) and "recent" in params and "window" not in params:
            # reports written before the window had one name everywhere called it ``recent``
            data = {**data, "params": {("window" if k == "recent" else k): v for k, v in params.items()}}
        required = [f.name for f in fields(cls) if _is_required(f)]
        missing = [name for name in required if name not in data]
        if missing:
            raise LightTransferError(
                f"{origin} lacks field(s) {', '.join(missing)}; it is not a complete analysis report."
            )
        try:
            report = cls(
                **{k: v for k, v in data.items() if k in {f.name for f in fields(cls)}}
                | {
                    "layers": [
                        LayerStats(layer=d["layer"], lazy_ratio=SummaryStat(**d["lazy_ratio"]),
                                   per_sample=list(d["per_sample"]))
                        for d in data["layers"]
                    ],
                    "query_heads": HeadStats(**{m: data["query_heads"][m] for m in HEAD_METRICS}),
                    "kv_heads": HeadStats(**{m: data["kv_heads"][m] for m in HEAD_METRICS}),
                }
            )
        except (KeyError, TypeError) as exc:
            raise LightTransferError(f"{origin} is malformed ({type(exc).__name__}: {exc}).") from exc
        report.validate(origin=origin)
        return report

    def validate(self, *, origin: str = "report") -> None:
        """Check that the shapes agree with ``num_layers`` / ``num_heads`` / ``num_kv_heads``."""
        problems = []
        if len(self.layers) != self.num_layers:
            problems.append(f"{len(self.layers)} layer entries for {self.num_layers} layers")
        if sorted(self.ranking) != list(range(self.num_layers)):
            problems.append("ranking is not a permutation of the layers")
        for name, stats, width in (("query_heads", self.query_heads, self.num_heads),
                                   ("kv_heads", self.kv_heads, self.num_kv_heads)):
            for metric in HEAD_METRICS:
                matrix = getattr(stats, metric)
                if len(matrix) != self.num_layers or any(len(row) != width for row in matrix):
                    problems.append(f"{name}.{metric} is not [{self.num_layers}][{width}]")
        gates = self.kv_head_gates
        if gates is not None and (len(gates) != self.num_layers or any(len(r) != self.num_kv_heads for r in gates)):
            problems.append(f"kv_head_gates is not [{self.num_layers}][{self.num_kv_heads}]")
        if self.head_score_method not in ("attention", "optimize") or (
                self.head_score_method == "optimize" and gates is None):
            problems.append(f"head_score_method '{self.head_score_method}' has no scores")
        if problems:
            raise LightTransferError(f"{origin} is inconsistent: {'; '.join(problems)}.")

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the report as JSON (sorted keys) atomically: a temp file beside ``path``, then a rename."""
        from ..output_files import write_json

        return write_json(path, self.to_dict(), indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AnalysisReport:
        """Read and validate a report written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise LightTransferError(f"report '{path}' does not exist; run 'lighttransfer analyze --out {path}'.")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LightTransferError(f"report '{path}' is not JSON ({exc}); pass a report written by analyze.") from exc
        return cls.from_dict(data, origin=f"report '{path}'")


def _is_required(f) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


__all__ = ["AnalysisReport", "LayerStats", "HeadStats", "SummaryStat", "SCHEMA_VERSION", "layer_scores_from_gates"]
