"""How much attention mass sparse prefill keeps, at what density, per layer, on calibration text.

For each layer's prefill (post-RoPE queries and keys captured during a normal forward, :mod:`.capture`):

* the *exact* block mass: every query row's causal softmax summed per key block of ``block_k``, averaged over the
  rows of each query block of ``block_q`` (float32 ``[batch, heads, q_blocks, k_blocks]``, rows summing to 1; the
  rows are computed in chunks, never ``n x N`` at once);
* for each ``alpha`` and list layout (``gqa_lists``), the block lists the runtime would build from the estimator's
  *estimate* (what :func:`lighttransfer.kernels.sparse_estimators.estimate_lists` does: one estimate per layer,
  selected at every ``alpha``);
* ``density``: share of causal key blocks visited (:meth:`~lighttransfer.kernels.block_lists.BlockLists.density`);
  ``kept_mass``: the exact mass inside the visited blocks, averaged over (head, query block), so the share of each
  query row's true attention the sparse prefill still sees (SampleAttention's CRA, arXiv 2406.15486, Sec. 3, whose
  complement bounds the renormalized output error by ``2 (1 - CRA) max ||v||``); ``min_head_kept_mass``: the worst
  query head's mean;
* with ``oracle``, the same for lists selected from the exact block mass itself (``lists_from="exact"``): what a
  perfect estimator would visit at that ``alpha``, so the estimator's own cost in density (or in mass) shows.

Only query blocks that see more than the always-kept sink and band count (elsewhere everything is kept anyway);
the first ``skip`` rows of short prompts would otherwise flatter the numbers. Cost per layer: the exact rows are
dense attention scores (``2 * n * N * D`` per head), fine at calibration lengths (4k-8k on a CPU, more on a GPU).
With ``layers`` given, each forward stops after the highest of them, so measuring a few low layers at a long length
costs only those layers' share of the forward.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import LightTransferError
from ..kernels.block_lists import always_kept, keep_mask
from ..kernels.block_select import GQA_LISTS, lists_for_alpha
from ..kernels.sparse_estimators import make_estimator, row_block_mass
from .capture import CaptureComplete, capture_attention, forward_captured

log = logging.getLogger(__name__)

SPARSE_MASS_SCHEMA_VERSION = 1


def exact_block_mass(q: torch.Tensor, k: torch.Tensor, *, block_q: int, block_k: int, scale: float,
                     q_offset: int | None = None) -> torch.Tensor:
    """Exact causal attention mass per (query block, key block), averaged over each query block's rows.

    ``q [batch, heads, n, D]`` (queries at key indices ``q_offset ..``, default ``N - n``), ``k [batch, kv_heads,
    N, D]``; returns float32 ``[batch, heads, ceil(n / block_q), ceil(N / block_k)]`` whose rows sum to 1."""
    n, n_kv = q.shape[2], k.shape[2]
    q_offset = n_kv - n if q_offset is None else q_offset
    q_blocks = -(-n // block_q)
    out = []
    rows_per_step = max(block_q, (1 << 22) // max(q.shape[1] * -(-n_kv // block_k), 1) // block_q * block_q)
    for lo in range(0, n, rows_per_step):
        hi = min(n, lo + rows_per_step)
        rows = torch.arange(lo, hi, device=q.device)
        mass = row_block_mass(q[:, :, lo:hi], rows + q_offset, k, scale, block_k)  # [B, H, rows, KB]
        pad = (-(hi - lo)) % block_q
        counts = torch.full((-(-(hi - lo) // block_q),), block_q, dtype=torch.float32, device=q.device)
        if pad:
            counts[-1] = block_q - pad
        mass = torch.nn.functional.pad(mass, (0, 0, 0, pad)).view(*mass.shape[:2], -1, block_q, mass.shape[-1])
        out.append(mass.sum(3) / counts.view(1, 1, -1, 1))
    result = torch.cat(out, dim=2)
    assert result.shape[2] == q_blocks
    return result


@dataclass(frozen=True)
class SparseMassRow:
    """One layer at one ``alpha`` and list layout, averaged over the calibration samples."""

    layer: int
    alpha: float
    gqa_lists: str
    density: float
    kept_mass: float
    min_head_kept_mass: float
    lists_from: str = "estimate"  # or "exact": selected from the exact block mass (the oracle)


@dataclass
class SparseMassReport:
    """Mass kept vs density per layer (see the module docstring); ``params`` holds the method and block grid."""

    model_id: str
    params: dict[str, Any]
    rows: list[SparseMassRow] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SPARSE_MASS_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "model_id": self.model_id, "params": dict(sorted(
            self.params.items())), "calibration": self.calibration, "rows": [asdict(r) for r in self.rows]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SparseMassReport:
        if d.get("schema_version") != SPARSE_MASS_SCHEMA_VERSION:
            raise LightTransferError(f"sparse mass report schema_version {d.get('schema_version')!r} is not "
                                     f"supported (this lighttransfer reads {SPARSE_MASS_SCHEMA_VERSION}).")
        return cls(model_id=d["model_id"], params=d["params"], calibration=d.get("calibration", {}),
                   rows=[SparseMassRow(**r) for r in d["rows"]])

    def save(self, path: str | os.PathLike[str]) -> None:
        from ..output_files import write_json

        write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SparseMassReport:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LightTransferError(f"cannot read the sparse mass report '{path}': {exc}.") from exc

    def summary(self) -> list[dict[str, Any]]:
        """Per (alpha, gqa_lists, lists_from): the mean over layers of density and kept mass, and the worst layer's
        kept mass."""
        groups: dict[tuple[float, str, str], list[SparseMassRow]] = {}
        for r in self.rows:
            groups.setdefault((r.alpha, r.gqa_lists, r.lists_from), []).append(r)
        return [dict(alpha=a, gqa_lists=g, lists_from=f, density=sum(r.density for r in rs) / len(rs),
                     kept_mass=sum(r.kept_mass for r in rs) / len(rs), min_layer_kept_mass=min(r.kept_mass for r in rs))
                for (a, g, f), rs in sorted(groups.items())]


class SparseMassRecorder:
    """Per attention call: exact block mass, estimated lists for every (alpha, layout), density and kept mass.

    With ``oracle``, every (alpha, layout) is also selected from the exact block mass (rows ``lists_from="exact"``).
    With ``layers`` given and ``stop_early``, the call of the highest of them raises
    :class:`~.capture.CaptureComplete` after its measurement, so that a forward runs only up to that layer."""

    def __init__(self, *, method: str, options: dict, alphas: Sequence[float], gqa_lists: Sequence[str],
                 block_q: int, block_k: int, sink_blocks: int, local_blocks: int,
                 layers: Sequence[int] | None = None, stop_early: bool = False, oracle: bool = False) -> None:
        self.estimator = make_estimator(method, **options)
        self.alphas, self.gqa_lists = list(alphas), list(gqa_lists)
        self.grid = dict(block_q=block_q, block_k=block_k)
        self.kept = dict(sink_blocks=sink_blocks, local_blocks=local_blocks)
        self.layers = None if layers is None else set(layers)
        self.stop_after = max(self.layers) if stop_early and self.layers else None
        self.oracle = oracle
        self._order: dict[int, int] = {}
        self.values: dict[tuple[int, float, str, str], list[tuple[float, float, float]]] = {}

    def record(self, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kwargs: dict) -> None:
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            layer = self._order.setdefault(id(module), len(self._order))
        layer = int(layer)
        if self.layers is not None and layer not in self.layers:
            return
        if not kwargs.get("sliding_window") and query.shape[2] >= 2:
            scale = kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)
            with torch.no_grad():
                self._measure(layer, query, key, float(scale))
        if layer == self.stop_after:
            raise CaptureComplete

    def _measure(self, layer: int, q: torch.Tensor, k: torch.Tensor, scale: float) -> None:
        n, n_kv = q.shape[2], k.shape[2]
        bq, bk = self.grid["block_q"], self.grid["block_k"]
        exact = exact_block_mass(q, k, block_q=bq, block_k=bk, scale=scale)  # [B, H, QB, KB]
        grid = dict(block_q=bq, block_k=bk, q_offset=n_kv - n, n_kv=n_kv, n_q=n, device=q.device)
        always = always_kept(exact.shape[2], **grid, **self.kept)
        causal = always_kept(exact.shape[2], **grid, sink_blocks=0, local_blocks=n_kv // bk + 1)
        counted = (causal & ~always).any(-1)  # [QB]: query blocks with a choice to make
        if not counted.any():
            return
        # one estimate per layer, selected at every alpha and layout (what estimate_lists does, split)
        estimate = self.estimator.block_mass(q, k, q_offset=n_kv - n, scale=scale, **self.grid)
        sources = {"estimate": estimate, **({"exact": exact} if self.oracle else {})}
        for source, mass in sources.items():
            for alpha in self.alphas:
                for layout in self.gqa_lists:
                    self._record(layer, alpha, layout, source, mass, exact, q, k, n, n_kv, causal, counted)

    def _record(self, layer: int, alpha: float, layout: str, source: str, mass: torch.Tensor, exact: torch.Tensor,
                q: torch.Tensor, k: torch.Tensor, n: int, n_kv: int, causal: torch.Tensor,
                counted: torch.Tensor) -> None:
        """Select from ``mass`` at ``alpha`` and ``layout``, and score the lists against the ``exact`` mass."""
        lists = lists_for_alpha(mass, alpha=alpha, **self.grid, q_offset=n_kv - n, n_kv=n_kv, n_q=n, **self.kept,
                                kv_heads=k.shape[1], gqa_lists=layout)
        # per query head: a KV head's list is visited by each of its query heads (packed or not)
        keep = keep_mask(lists).repeat_interleave(q.shape[1] // lists.indices.shape[1], dim=1)
        kept = (exact * keep).sum(-1)[:, :, counted]  # [B, H, counted]
        visited = keep[:, :, counted].sum(-1).float()
        dense = causal[counted].sum(-1).float()
        density = (visited / dense).mean().item()
        per_head = kept.mean(dim=(0, 2))
        self.values.setdefault((layer, alpha, layout, source), []).append(
            (density, kept.mean().item(), per_head.min().item()))

    def rows(self) -> list[SparseMassRow]:
        out = []
        # estimate rows before their exact (oracle) twins
        for (layer, alpha, layout, source), vals in sorted(self.values.items(),
                                                           key=lambda kv: (*kv[0][:3], kv[0][3] != "estimate")):
            m = len(vals)
            out.append(SparseMassRow(layer=layer, alpha=alpha, gqa_lists=layout,
                                     density=sum(v[0] for v in vals) / m, kept_mass=sum(v[1] for v in vals) / m,
                                     min_head_kept_mass=min(v[2] for v in vals), lists_from=source))
        return out


def check_sparse_mass_params(*, method: str, alphas: Sequence[float], gqa_lists: Sequence[str], block_q: int,
                             block_k: int) -> None:
    """One-line errors for options that cannot work, before any model loads."""
    from ..hybrid_format import SPARSE_METHODS

    if method not in SPARSE_METHODS:
        raise LightTransferError(f"--method {method!r} is not known; use one of {', '.join(SPARSE_METHODS)}.")
    if not alphas or any(isinstance(a, bool) or not 0 < float(a) <= 1 for a in alphas):
        raise LightTransferError(f"--alphas must be numbers in (0, 1], got {list(alphas)!r}.")
    bad = [g for g in gqa_lists if g not in GQA_LISTS]
    if not gqa_lists or bad:
        raise LightTransferError(f"--gqa-lists must be among {', '.join(GQA_LISTS)}, got {list(gqa_lists)!r}.")
    for name, value in (("block-q", block_q), ("block-k", block_k)):
        if value < 16 or value & (value - 1):
            raise LightTransferError(f"--{name} must be a power of two >= 16, got {value}.")


def sparse_mass_tokens(model, input_ids: torch.Tensor, *, method: str = "sample", options: dict | None = None,
                       alphas: Sequence[float] = (0.9, 0.95, 0.98), gqa_lists: Sequence[str] = ("query",),
                       block_q: int = 128, block_k: int = 64, sink_blocks: int = 1, local_blocks: int = 2,
                       layers: Sequence[int] | None = None, model_id: str = "",
                       calibration: dict | None = None, oracle: bool = False) -> SparseMassReport:
    """The report on ready token rows ``input_ids [samples, seq_len]``, one row per forward (no tokenizer)."""
    check_sparse_mass_params(method=method, alphas=alphas, gqa_lists=gqa_lists, block_q=block_q, block_k=block_k)
    recorder = SparseMassRecorder(method=method, options=options or {}, alphas=alphas, gqa_lists=gqa_lists,
                                  block_q=block_q, block_k=block_k, sink_blocks=sink_blocks,
                                  local_blocks=local_blocks, layers=layers, stop_early=True, oracle=oracle)
    device = next(model.parameters()).device
    with capture_attention(model, recorder), torch.no_grad():
        for i in range(input_ids.shape[0]):
            # the layers above the last one measured never run
            forward_captured(model, input_ids=input_ids[i : i + 1].to(device), use_cache=False)
            log.info("sparse mass: sample %d/%d", i + 1, input_ids.shape[0])
    params = dict(method=method, options=options or {}, alphas=list(alphas), gqa_lists=list(gqa_lists),
                  block_q=block_q, block_k=block_k, sink_blocks=sink_blocks, local_blocks=local_blocks,
                  seq_len=int(input_ids.shape[1]), samples=int(input_ids.shape[0]), oracle=oracle)
    return SparseMassReport(model_id=model_id, params=params, rows=recorder.rows(), calibration=calibration or {})


def sparse_mass(model, *, calib=None, seq_len: int = 4096, samples: int = 2, seed: int = 0, field: str = "text",
                device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
                **options) -> SparseMassReport:
    """Load ``model`` (a spec or a :class:`~lighttransfer.loading.LoadedModel`), cut ``samples`` rows of ``seq_len``
    tokens of calibration text (``calib``, default the shipped text) and measure them (:func:`sparse_mass_tokens`,
    whose keyword options pass through)."""
    from ..calibration import check_sources, load_calibration
    from ..loading import LoadedModel, load_model

    check_sparse_mass_params(method=options.get("method", "sample"), alphas=options.get("alphas", (0.9,)),
                             gqa_lists=options.get("gqa_lists", ("query",)), block_q=options.get("block_q", 128),
                             block_k=options.get("block_k", 64))
    check_sources(calib, field=field)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device, dtype=dtype,
                                                                      trust_remote_code=trust_remote_code)
    calib_set = load_calibration(calib, loaded.tokenizer, seq_len=seq_len, samples=samples, seed=seed, field=field)
    return sparse_mass_tokens(loaded.model, calib_set.input_ids, model_id=loaded.model_id,
                              calibration=calib_set.to_dict(), **options)


__all__ = ["SparseMassReport", "SparseMassRow", "SparseMassRecorder", "exact_block_mass", "sparse_mass",
           "sparse_mass_tokens", "check_sparse_mass_params", "SPARSE_MASS_SCHEMA_VERSION"]
