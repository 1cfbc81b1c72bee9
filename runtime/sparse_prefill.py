"""Block-sparse prefill of the full layers: estimate, keep key blocks by cumulative mass, run the block kernel.

With ``lighttransfer.load(..., prefill_sparse="sample")`` (or a ``sparse_prefill`` entry in the checkpoint block),
a full layer's prefill forward with ``n > 1`` queries against ``N >= min_len`` keys runs:

1. the estimator (:mod:`lighttransfer.kernels.sparse_estimators`) on the layer's post-RoPE queries and keys,
   giving per (query head, query block) the estimated mass of each key block;
2. the selector: the sink blocks, the local band, and the heaviest other blocks until ``alpha`` of the mass, per
   query head or per KV head (``gqa_lists``);
3. :func:`lighttransfer.kernels.block_sparse_attention` on CUDA (Triton; lists per KV head run packed, the group's
   query heads in one tile, when ``GROUP * block_q`` rows fit); on the CPU PyTorch SDPA under the same
   blocks as an explicit mask, a few query blocks at a time (``block_sparse_attention_sdpa``).

Anything else stays on the dense path: prompts (or chunks) whose key count is below ``min_len``, decode steps, the
model's own sliding layers, dropout. Left padding is honoured (padding keys are masked in every listed block).

Chunked prefill: each chunk is one forward, so each chunk estimates its own lists, for its ``n`` queries against
every key cached so far plus its own (``q_offset = N - n``), and goes sparse once ``N >= min_len``; the first
chunks of a long prompt therefore stay dense and the later ones (the expensive ones) go sparse.

Per layer and forward the realised density is recorded in :class:`SparsePrefillStats` (``sparse_prefill_stats``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .. import kernels
from ..errors import LightTransferError
from ..hybrid_format import HybridConfig, SparsePrefillConfig
from ..kernels.sparse_estimators import estimate_lists, make_estimator
from ..kernels.sparse_prefill import block_sparse_attention, block_sparse_attention_sdpa


@dataclass(frozen=True)
class PrefillRecord:
    """One full layer's prefill forward: ``queries`` x ``keys``, the share of causal key blocks visited
    (``density``, 1.0 when it ran dense) and, when timing was asked for, the estimation time in seconds."""

    layer: int
    queries: int
    keys: int
    sparse: bool
    density: float
    estimate_s: float | None = None


@dataclass
class SparsePrefillStats:
    """Records of the full layers' prefill forwards since the last :meth:`clear` (``timing``: synchronize and time
    each estimation; off by default because the synchronization costs)."""

    records: list[PrefillRecord] = field(default_factory=list)
    timing: bool = False

    def clear(self) -> None:
        self.records.clear()

    def density_by_layer(self) -> dict[int, float]:
        """Mean realised density per layer over the sparse forwards (layers that only ran dense are absent)."""
        sums: dict[int, list[float]] = {}
        for r in self.records:
            if r.sparse:
                sums.setdefault(r.layer, []).append(r.density)
        return {layer: sum(v) / len(v) for layer, v in sorted(sums.items())}

    def mean_density(self) -> float | None:
        """Mean over the sparse records (``None`` when nothing ran sparse)."""
        values = [r.density for r in self.records if r.sparse]
        return sum(values) / len(values) if values else None


class SparsePrefill:
    """A model's sparse prefill: its settings, estimator and stats."""

    def __init__(self, config: SparsePrefillConfig) -> None:
        self.config = config
        self.estimator = make_estimator(config.method, **config.options)
        self.stats = SparsePrefillStats()

    def applies(self, q: torch.Tensor, k: torch.Tensor, *, sliding_window, dropout: float) -> bool:
        """Whether this forward of a full layer goes block-sparse."""
        n, big_n = q.shape[2], k.shape[2]
        return (n > 1 and big_n >= self.config.min_len and not sliding_window and dropout == 0.0
                and q.dtype in kernels.SUPPORTED_DTYPES and q.shape[-1] <= kernels.MAX_HEAD_DIM)

    def attend(self, q, k, v, *, layer_idx: int, scale: float | None,
               kv_start: torch.Tensor | None) -> torch.Tensor:
        """Block-sparse causal attention of the ``n`` queries (the last ``n`` of the ``N`` keys):
        ``[batch, heads, n, head_dim]``."""
        cfg = self.config
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        timing = self.stats.timing
        if timing and q.is_cuda:
            torch.cuda.synchronize(q.device)
        t0 = time.perf_counter()
        lists = estimate_lists(self.estimator, q, k, alpha=cfg.alpha, block_q=cfg.block_q, block_k=cfg.block_k,
                               sink_blocks=cfg.sink_blocks, local_blocks=cfg.local_blocks, scale=scale,
                               gqa_lists=cfg.gqa_lists)
        if timing and q.is_cuda:
            torch.cuda.synchronize(q.device)
        spent = time.perf_counter() - t0 if timing else None
        start = None if kv_start is None else kv_start.to(device=q.device, dtype=torch.int32)
        if q.is_cuda and not kernels.reference_forced():
            out = block_sparse_attention(q, k, v, lists, kv_start=start, scale=scale)
        else:
            out = block_sparse_attention_sdpa(q, k, v, lists, kv_start=start, scale=scale)
        self.stats.records.append(PrefillRecord(layer=layer_idx, queries=q.shape[2], keys=k.shape[2], sparse=True,
                                                density=lists.density(), estimate_s=spent))
        return out


def resolve_sparse_prefill(config, *, method: str | None, alpha: float | None,
                           min_len: int | None) -> SparsePrefillConfig | None:
    """The checkpoint block's ``sparse_prefill`` with explicit options over it.

    ``method``: ``None`` keeps the block's choice (dense without one), ``"dense"`` turns it off, else a method name.
    ``alpha``/``min_len`` without a method (and without a block entry) are an error: they would do nothing.
    """
    block = HybridConfig.from_model_config(config)
    stored = block.sparse_prefill_config() if block is not None else None
    if method == "dense":
        return None
    if method is None and stored is None:
        if alpha is not None or min_len is not None:
            raise LightTransferError("prefill_alpha / prefill_min_len need prefill_sparse='sample', 'vslash' or "
                                     "'antidiag' (the checkpoint stores no sparse prefill).")
        return None
    base = stored.to_dict() if stored is not None else {}
    if method is not None and method != base.get("method"):
        base = {"method": method}  # another method: its own defaults and options
    if alpha is not None:
        base["alpha"] = alpha
    if min_len is not None:
        base["min_len"] = min_len
    return SparsePrefillConfig.from_dict(base)


__all__ = ["SparsePrefill", "SparsePrefillStats", "PrefillRecord", "resolve_sparse_prefill"]
