"""S²-Attn of a whole full layer as causal attention over groups: no mask, the fused causal kernel on each group.

A layer whose every query head follows LongLoRA's plain S²-Attn (:func:`~.masks.s2_rule` with no sink; the first
half of the heads on the grid ``[0, G), [G, 2G), ...``, the second half on the grid moved by ``G / 2``) attends only
within contiguous runs of positions. So it is plain causal attention on each run, and runs of one length batch
together: ``[B, h, N, D]`` becomes ``[B * (N // G), h, G, D]``. Here SDPA's causal kernel (flash attention on
CUDA) computes exactly the pairs the pattern holds, forward and backward, with no ``N x N`` mask and no
FlexAttention block walk.

The shifted grid is cut without rolling. Its runs are ``[0, G/2)``, then whole groups ``[G/2 + iG, 3G/2 + iG)``,
then what is left. The first tokens never share a run with the last (the LongLoRA bug that :mod:`.masks` documents
and ``tests/test_training_masks.py`` catches; the tests hold this path to the same predicate). A length that is not
a multiple of ``G`` leaves a shorter last run, computed on its own.

Shapes: ``query [B, H, N, D]``, ``key / value [B, Hkv, N, D]`` (GQA: contiguous groups of ``H / Hkv`` query
heads); the output is ``[B, H, N, D]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .masks import LayerRules, s2_rule, s2_shifted_heads


def grouped_s2_group(rules: LayerRules) -> int | None:
    """The group size if ``rules`` is a plain S²-Attn layer this path computes (every head :func:`~.masks.s2_rule`
    of one group size, no sink, the shifted heads those of :func:`~.masks.s2_shifted_heads`), else ``None``."""
    if not rules.heads:
        return None
    group = rules.heads[0].group
    shifted = s2_shifted_heads(len(rules.heads))
    want = tuple(s2_rule(group, shifted=s) for s in shifted)
    return group if rules.heads == want and group >= 2 else None


def _runs(seq_len: int, group: int, shift: int) -> list[tuple[int, int, int]]:
    """The grid's runs as ``(start, count, length)``: ``count`` consecutive runs of ``length`` tokens from
    ``start``; together they cover ``[0, seq_len)`` in order."""
    runs = []
    start = (group - shift) % group  # the first boundary of the grid after 0 (0: the grid starts at 0)
    if start > 0:
        runs.append((0, 1, min(start, seq_len)))
    if start < seq_len:
        whole = (seq_len - start) // group
        if whole:
            runs.append((start, whole, group))
        tail = start + whole * group
        if tail < seq_len:
            runs.append((tail, 1, seq_len - tail))
    return runs


def _to_runs(t: torch.Tensor, start: int, count: int, length: int) -> torch.Tensor:
    """``t [B, h, N, D]``'s positions ``[start, start + count * length)`` as ``[B * count, h, length, D]``."""
    b, h, _, d = t.shape
    part = t[:, :, start : start + count * length]
    return part.reshape(b, h, count, length, d).transpose(1, 2).reshape(b * count, h, length, d)


def _causal_runs(q, k, v, runs, *, scale, dropout, gqa) -> torch.Tensor:
    """Causal attention within each run of ``runs`` (from :func:`_runs`), concatenated along the sequence."""
    b, h, _, d = q.shape
    outs = []
    for start, count, length in runs:
        o = F.scaled_dot_product_attention(_to_runs(q, start, count, length), _to_runs(k, start, count, length),
                                           _to_runs(v, start, count, length), is_causal=True, scale=scale,
                                           dropout_p=dropout, enable_gqa=gqa)
        outs.append(o.reshape(b, count, h, length, d).transpose(1, 2).reshape(b, h, count * length, d))
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


def s2_grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, group: int,
                         scale: float | None = None, dropout: float = 0.0) -> torch.Tensor:
    """S²-Attn of a whole layer, ``[B, H, N, D]``, equal to SDPA with :func:`~.masks.dense_mask` of the layer's
    :func:`~.masks.layer_rules` (``s2_group=group``, no streaming heads, no sink).

    The unshifted heads ``[0, H // 2)`` and the shifted ``[H // 2, H)`` run as two causal batches over their
    grids' runs. Where the split falls inside a GQA group (``Hkv`` odd), the KV heads are repeated for the
    query heads of each half; otherwise each half reads its own KV heads."""
    heads, kv_heads = query.shape[1], key.shape[1]
    per_kv = heads // kv_heads
    half = heads // 2
    seq_len = query.shape[2]
    outs = []
    for lo, hi, shift in ((0, half, 0), (half, heads, group // 2)):
        if lo == hi:
            continue
        q = query[:, lo:hi]
        if lo % per_kv == 0 and hi % per_kv == 0:
            k, v = key[:, lo // per_kv : hi // per_kv], value[:, lo // per_kv : hi // per_kv]
        else:  # the halves cut a GQA group: one KV head per query head
            index = torch.arange(lo, hi, device=key.device) // per_kv
            k, v = key.index_select(1, index), value.index_select(1, index)
        outs.append(_causal_runs(q, k, v, _runs(seq_len, group, shift), scale=scale, dropout=dropout,
                                 gqa=q.shape[1] != k.shape[1]))
    return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]


__all__ = ["s2_grouped_attention", "grouped_s2_group"]
