"""The shortened block tables of the vLLM plugin's CUDA path (no vLLM needed): attention computed the way vLLM's
Triton kernel computes it in its R-SWA mode (every key up to the sequence end read through the table, the
prefix-plus-window mask applied, masked weights multiplied in) over the shortened tables equals the plain
sink + window attention over the full tables, while the blocks freed between sink and window hold NaN."""

from __future__ import annotations

import pytest
import torch
from lighttransfer.serving.vllm.paged import sink_window_paged_attention
from lighttransfer.serving.vllm.window_table import dropped_blocks, max_shortened_len, shorten_block_tables


def _rswa_like_kernel(query, key_cache, value_cache, table_row, *, seq_len, prefix, window, scale):
    """Every key ``< seq_len`` read through ``table_row`` (as the kernel reads its tiles), masked with
    ``j <= p and (j < prefix or p - j < window)``; a NaN in any read key or value poisons the result."""
    q_len, heads, head_dim = query.shape
    kv_heads, block_size = key_cache.shape[1], key_cache.shape[2]
    pos = torch.arange(seq_len)
    blocks, offsets = table_row.long()[pos // block_size], pos % block_size
    k = key_cache[blocks, :, offsets].float()
    v = value_cache[blocks, :, offsets].float()
    q = query.float().view(q_len, kv_heads, heads // kv_heads, head_dim)
    q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
    visible = (pos[None] <= q_pos) & ((pos[None] < prefix) | (q_pos - pos[None] < window))
    scores = torch.einsum("qhgd,khd->hgqk", q, k) * scale
    scores = torch.where(visible, scores, torch.full_like(scores, -1e30))  # finite: as the kernel's masked tiles
    probs = torch.softmax(scores, dim=-1) * visible
    return torch.einsum("hgqk,khd->qhgd", probs, v).reshape(q_len, heads, head_dim)


def _freed(seq_len: int, q_len: int, *, sink: int, window: int, block_size: int) -> range:
    """Blocks vLLM's sink + window manager has freed before this step (between the sink blocks and the window)."""
    sink_blocks = -(-sink // block_size)
    first_key = max(0, seq_len - q_len - window + 1)
    return range(sink_blocks, max(sink_blocks, first_key // block_size))


@pytest.mark.parametrize("sink,window,block_size", [(4, 40, 16), (0, 17, 16), (16, 32, 16), (20, 1, 16),
                                                    (4, 64, 32), (40, 24, 16)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 1)])
def test_shortened_tables_give_sink_window_attention_and_read_no_freed_block(sink, window, block_size, heads,
                                                                              kv_heads):
    torch.manual_seed(sink * 1000 + window + heads)
    head_dim, max_blocks = 8, 24
    # (seq_len, query_len): decode far past the window, a prefill chunk, a short prompt, exact block edges
    requests = [(300, 1), (257, 64), (9, 9), (block_size * 10, 1), (sink + window + 1, 3), (200, 200)]
    num_blocks = len(requests) * max_blocks + 1
    key_cache = torch.randn(num_blocks, kv_heads, block_size, head_dim)
    value_cache = torch.randn(num_blocks, kv_heads, block_size, head_dim)
    ids = torch.randperm(num_blocks - 1)[: len(requests) * max_blocks] + 1  # block 0: vLLM's null block
    table = ids.view(len(requests), max_blocks).to(torch.int32)
    for r, (seq_len, q_len) in enumerate(requests):
        for b in _freed(seq_len, q_len, sink=sink, window=window, block_size=block_size):
            key_cache[table[r, b]] = float("nan")
            value_cache[table[r, b]] = float("nan")
            table[r, b] = 0
    key_cache[0], value_cache[0] = float("nan"), float("nan")
    seq_lens = torch.tensor([s for s, _ in requests], dtype=torch.int32)
    query_lens = torch.tensor([q for _, q in requests], dtype=torch.int32)
    out_table, out_lens = torch.full_like(table, -7), torch.zeros_like(seq_lens)
    short_table, short_lens = shorten_block_tables(table, seq_lens, query_lens, sink=sink, window=window,
                                                   block_size=block_size, out_table=out_table,
                                                   out_seq_lens=out_lens)
    assert short_table is out_table and short_lens is out_lens and short_lens.dtype == seq_lens.dtype
    bound = max_shortened_len(int(seq_lens.max()), int(query_lens.max()), sink=sink, window=window,
                              block_size=block_size)
    assert int(short_lens.max()) <= bound
    scale = head_dim ** -0.5
    for r, (seq_len, q_len) in enumerate(requests):
        query = torch.randn(q_len, heads, head_dim)
        want = sink_window_paged_attention(query, key_cache, value_cache, table[r], seq_len=seq_len, sink=sink,
                                           window=window, scale=scale)
        got = _rswa_like_kernel(query, key_cache, value_cache, short_table[r], seq_len=int(short_lens[r]),
                                prefix=sink, window=window, scale=scale)
        assert torch.isfinite(got).all(), f"request {r} read a freed block"
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # the kernel's cost is the shortened length: bounded by sink + window + the step, not by the context
        sink_blocks = -(-sink // block_size)
        assert int(short_lens[r]) <= sink_blocks * block_size + window + q_len + block_size


def test_nothing_is_dropped_before_the_window_passes_the_sink_blocks():
    lens = torch.tensor([10, 40, 47, 48, 49, 1000])
    got = dropped_blocks(lens, torch.ones_like(lens), sink=4, window=32, block_size=16)
    # first key seen = seq_len - 1 - 31; blocks wholly before it, less the one sink block
    assert got.tolist() == [0, 0, 0, 0, 0, (1000 - 32) // 16 - 1]
    assert dropped_blocks(torch.tensor([1000]), torch.tensor([1]), sink=0, window=32,
                          block_size=16).tolist() == [(1000 - 32) // 16]
