"""The attention mass a query puts on its sink + window keys, in blocks, without an N x N matrix.

The math of LightTransfer's lazy ratio (arXiv 2410.13846, Eq. 1; what it means and where we deviate from the
paper is written in :mod:`lighttransfer.analysis.lazy_ratio`), kept here beside the mask rule it uses
(:func:`.mask.streaming_visible`) because two stages need it: the analysis measures it on calibration text and
the runtime's online mode on each prompt.
"""

from __future__ import annotations

import torch

from .mask import streaming_visible

DEFAULT_BLOCK = 1024


def streaming_attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    q_offset: int,
    sink: int,
    window: int,
    scale: float,
    softcap: float | None = None,
    block_size: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """Per query, the share of its causal softmax attention that falls on its sink + window keys (Eq. 1).

    Args:
        q: ``[batch, q_heads, q_len, head_dim]`` post-RoPE queries (any float dtype; math runs in fp32).
        k: ``[batch, kv_heads, k_len, head_dim]`` post-RoPE keys at positions ``0 .. k_len - 1``;
            ``q_heads`` is a multiple of ``kv_heads`` (GQA: query head ``h`` reads KV head
            ``h // (q_heads // kv_heads)``, as transformers' ``repeat_kv`` does).
        q_offset: absolute position of ``q[:, :, 0]``; the queries sit at ``q_offset .. q_offset + q_len - 1``
            and ``q_offset + q_len <= k_len``.
        sink: number of initial tokens kept (>= 0).
        window: number of most window positions kept, the query's own included (>= 1).
        scale: score scale (the layer's ``scaling``, usually ``head_dim ** -0.5``).
        softcap: tanh soft-capping of the scores, for models that use it (``None``: off).
        block_size: keys per block.

    Returns:
        ``[batch, q_heads, q_len]`` float32 in [0, 1].
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    if q_offset + q_len > k_len:
        raise ValueError(f"queries end at {q_offset + q_len} but there are only {k_len} keys")
    if window < 1 or sink < 0:
        raise ValueError(f"need sink >= 0 and window >= 1, got sink={sink}, window={window}")
    group = q_heads // kv_heads
    # fold each GQA group's query heads into the row axis, so keys are never repeated
    qf = q.reshape(batch, kv_heads, group * q_len, head_dim).float() * scale
    q_pos = (torch.arange(q_len, device=q.device) + q_offset).repeat(group)[:, None]  # [group * q_len, 1]
    rows = (batch, kv_heads, group * q_len)
    lse_all = torch.full(rows, float("-inf"), device=q.device)
    lse_kept = torch.full(rows, float("-inf"), device=q.device)
    k_end = q_offset + q_len  # keys after the last query are masked for every query
    for start in range(0, k_end, block_size):
        stop = min(start + block_size, k_end)
        scores = qf @ k[:, :, start:stop].float().transpose(-1, -2)  # [batch, kv_heads, group * q_len, block]
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        k_pos = torch.arange(start, stop, device=q.device)[None, :]
        if stop - 1 > q_offset:  # only the block holding the queries' own positions has future keys
            scores = scores.masked_fill(~(k_pos <= q_pos), float("-inf"))
        lse_all = torch.logaddexp(lse_all, torch.logsumexp(scores, dim=-1))
        coverage = _block_coverage(start, stop, q_first=q_offset, q_last=k_end - 1, sink=sink, window=window)
        if coverage == "all":
            lse_kept = torch.logaddexp(lse_kept, torch.logsumexp(scores, dim=-1))
        elif coverage == "some":
            kept = streaming_visible(q_pos, k_pos, sink, window)  # [group * q_len, block]
            lse_kept = torch.logaddexp(lse_kept, torch.logsumexp(scores.masked_fill(~kept, float("-inf")), -1))
    mass = torch.exp(lse_kept - lse_all).clamp_(0.0, 1.0)
    return mass.reshape(batch, q_heads, q_len)


def _block_coverage(start: int, stop: int, *, q_first: int, q_last: int, sink: int, window: int) -> str:
    """Whether keys ``[start, stop)`` are kept for ``all``, ``some`` or ``none`` of the causal (query, key)
    pairs of queries ``q_first .. q_last``; decided on ints so that no device sync is needed."""
    first_unsunk = max(start, sink)
    if first_unsunk >= stop or q_last - first_unsunk < window:
        return "all"
    # the union of the queries' windows is (q_first - window, q_last]
    if start < sink or (stop - 1 > q_first - window and start <= q_last):
        return "some"
    return "none"


def stats_workspace_bytes(*, batch: int, q_heads: int, q_len: int, head_dim: int, k_len: int,
                          block_size: int = DEFAULT_BLOCK) -> int:
    """Bytes :func:`streaming_attention_mass` holds at once at most: fp32 queries, one fp32 key block, two
    score tiles and the running log-sum-exps (an estimate of the extra memory of the analysis per layer)."""
    block = min(block_size, k_len)
    queries = batch * q_heads * q_len * head_dim
    tiles = 2 * batch * q_heads * q_len * block
    keys = batch * q_heads * block * head_dim  # upper bound: kv_heads <= q_heads
    return 4 * (queries + tiles + keys + 3 * batch * q_heads * q_len)


__all__ = ["streaming_attention_mass", "stats_workspace_bytes", "DEFAULT_BLOCK"]
