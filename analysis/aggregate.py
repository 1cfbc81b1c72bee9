"""Aggregate per-sample head statistics into the report's layer and head tables, and rank the layers."""

from __future__ import annotations

import torch

from .report import HeadStats, LayerStats, SummaryStat


def _rows(t: torch.Tensor, digits: int = 6) -> list[list[float]]:
    return [[round(float(x), digits) for x in row] for row in t]


def _std(t: torch.Tensor, dim: int) -> torch.Tensor:
    # population std: with one sample the spread is 0, not NaN
    return t.std(dim=dim, correction=0)


def layer_stats(lazy: torch.Tensor) -> list[LayerStats]:
    """Per layer, the lazy ratio over samples.

    Args:
        lazy: ``[samples, layers, q_heads]`` float32, each head's lazy ratio (mean over its last queries).
    """
    per_sample = lazy.double().mean(dim=-1)  # [samples, layers]: Eq. 1, averaged over heads
    mean, std = per_sample.mean(dim=0), _std(per_sample, 0)
    low, high = per_sample.min(dim=0).values, per_sample.max(dim=0).values
    return [
        LayerStats(
            layer=i,
            lazy_ratio=SummaryStat(mean=round(float(mean[i]), 6), std=round(float(std[i]), 6),
                                   min=round(float(low[i]), 6), max=round(float(high[i]), 6)),
            per_sample=[round(float(x), 6) for x in per_sample[:, i]],
        )
        for i in range(per_sample.shape[1])
    ]


def query_head_stats(lazy: torch.Tensor, share: torch.Tensor) -> HeadStats:
    """Per query head, averaged over samples.

    Args:
        lazy: ``[samples, layers, q_heads]`` lazy ratio per head and sample.
        share: ``[samples, layers, q_heads]`` long-query share per head and sample.
    """
    lazy, share = lazy.double(), share.double()
    return HeadStats(
        lazy_ratio=_rows(lazy.mean(0)),
        lazy_ratio_std=_rows(_std(lazy, 0)),
        long_context_mass=_rows(1.0 - lazy.mean(0)),
        long_query_share=_rows(share.mean(0)),
    )


def kv_head_stats(lazy: torch.Tensor, share: torch.Tensor, *, num_kv_heads: int) -> HeadStats:
    """Per KV head: within each sample, the min lazy ratio (max long-context mass and share) over the KV
    head's GQA group of query heads, then averaged over samples.

    Args:
        lazy, share: ``[samples, layers, q_heads]``; query head ``h`` belongs to KV head
            ``h // (q_heads // num_kv_heads)``.
    """
    s, layers, q_heads = lazy.shape
    group = q_heads // num_kv_heads
    lazy_kv = lazy.double().reshape(s, layers, num_kv_heads, group).min(dim=-1).values
    share_kv = share.double().reshape(s, layers, num_kv_heads, group).max(dim=-1).values
    return HeadStats(
        lazy_ratio=_rows(lazy_kv.mean(0)),
        lazy_ratio_std=_rows(_std(lazy_kv, 0)),
        long_context_mass=_rows(1.0 - lazy_kv.mean(0)),
        long_query_share=_rows(share_kv.mean(0)),
    )


def rank_layers(lazy_ratios: list[float]) -> list[int]:
    """Layer indices from most to least lazy; ties keep the lower index first."""
    return sorted(range(len(lazy_ratios)), key=lambda i: (-lazy_ratios[i], i))


__all__ = ["layer_stats", "query_head_stats", "kv_head_stats", "rank_layers"]
