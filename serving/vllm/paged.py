"""Sink + window attention over a paged KV cache, in plain PyTorch (the CPU path of the vLLM plugin).

vLLM keeps each request's keys and values in fixed-size blocks of a shared pool; a request's block table row
maps its token position ``p`` to block ``table[p // block_size]``, slot ``p % block_size``. For a streaming
layer the pool only holds the blocks a query can still see: the sink blocks and the blocks of the recent
window (the rest are freed and their table entries point at a null block, never read here).

A query at position ``p`` sees key ``j`` when :func:`~lighttransfer.kernels.mask.streaming_visible` says so:
``j <= p`` and (``j < sink`` or ``p - j < window``). Queries are processed in chunks of at most
``query_chunk`` tokens, so a chunk reads ``sink + window + chunk - 1`` keys at most: never an N x N matrix.
"""

from __future__ import annotations

import torch

from ...kernels.mask import streaming_visible


def write_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store new tokens' keys and values in the paged cache.

    Args:
        key, value: ``[tokens, kv_heads, head_dim]`` (only the first ``len(slot_mapping)`` rows are stored).
        key_cache, value_cache: ``[num_blocks, kv_heads, block_size, head_dim]`` (views may be strided).
        slot_mapping: ``[tokens]`` int, ``block * block_size + offset`` per token; negative = padding, skipped.
    """
    slots = slot_mapping.to(torch.long)
    n = slots.numel()
    keep = slots >= 0
    block_size = key_cache.shape[2]
    slots = slots[keep]
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, :, offsets] = key[:n][keep].to(key_cache.dtype)
    value_cache[blocks, :, offsets] = value[:n][keep].to(value_cache.dtype)


def _positions_seen(first_query: int, last_query: int, *, sink: int, window: int) -> torch.Tensor:
    """Key positions some query in ``[first_query, last_query]`` sees: the sinks, then the band."""
    band_start = max(0, first_query - window + 1)
    return torch.cat([torch.arange(min(sink, band_start)), torch.arange(band_start, last_query + 1)])


def sink_window_paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                block_table: torch.Tensor, *, seq_len: int, sink: int, window: int, scale: float,
                                query_chunk: int = 256) -> torch.Tensor:
    """Attention of one request's new queries over its paged keys, sink + window masked.

    Args:
        query: ``[q_len, heads, head_dim]``, the last ``q_len`` tokens of the request (positions
            ``seq_len - q_len .. seq_len - 1``); their keys are already in the cache.
        key_cache, value_cache: ``[num_blocks, kv_heads, block_size, head_dim]``; ``heads`` is a multiple of
            ``kv_heads`` (GQA: query head ``h`` reads KV head ``h // (heads // kv_heads)``).
        block_table: ``[max_blocks]`` int, the request's row of the block table.
        seq_len: tokens of the request so far, the new ones included.
        sink, window: the streaming rule (``window >= 1``, ``sink >= 0``).
        scale: softmax scale (``head_dim ** -0.5`` for most models).

    Returns:
        ``[q_len, heads, head_dim]`` in ``query``'s dtype (computed in float32).
    """
    q_len, heads, head_dim = query.shape
    kv_heads, block_size = key_cache.shape[1], key_cache.shape[2]
    group = heads // kv_heads
    out = torch.empty_like(query)
    table = block_table.to(torch.long)
    first = seq_len - q_len
    for start in range(0, q_len, query_chunk):
        stop = min(q_len, start + query_chunk)
        q_pos = torch.arange(first + start, first + stop)
        k_pos = _positions_seen(first + start, first + stop - 1, sink=sink, window=window)
        blocks = table[k_pos // block_size].to(key_cache.device)
        offsets = (k_pos % block_size).to(key_cache.device)
        k = key_cache[blocks, :, offsets].float()  # [keys, kv_heads, head_dim]
        v = value_cache[blocks, :, offsets].float()
        q = query[start:stop].float().view(stop - start, kv_heads, group, head_dim)
        scores = torch.einsum("qhgd,khd->hgqk", q, k) * scale
        visible = streaming_visible(q_pos[:, None], k_pos[None, :], sink, window).to(scores.device)
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:stop] = torch.einsum("hgqk,khd->qhgd", probs, v).reshape(stop - start, heads, head_dim).to(out.dtype)
    return out


__all__ = ["write_kv", "sink_window_paged_attention"]
