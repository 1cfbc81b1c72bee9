"""The vLLM plugin's plain PyTorch path (``serving/vllm/paged.py``) against the fp32 masked reference.

No vLLM needed: the paged layout is built here. Blocks the streaming rule no longer needs are pointed at a
block of NaNs (vLLM points freed entries at its null block): reading one would poison the output.
"""

from __future__ import annotations

import math

import pytest
import torch
from lighttransfer.kernels.mask import streaming_mask
from lighttransfer.kernels.reference import masked_attention
from lighttransfer.serving.vllm.paged import sink_window_paged_attention, write_kv


def _paged(k, v, block_size, *, sink, first_query, window, seed):
    """Scatter ``k/v [kv_heads, seq, D]`` into a shuffled block pool; unseen blocks -> the NaN block 0."""
    kv_heads, seq, dim = k.shape
    n_blocks = math.ceil(seq / block_size)
    g = torch.Generator().manual_seed(seed)
    ids = (torch.randperm(n_blocks + 3, generator=g)[:n_blocks] + 1).tolist()
    pool_k = torch.randn(n_blocks + 4, kv_heads, block_size, dim, generator=g).to(k.dtype)
    pool_v = torch.randn(n_blocks + 4, kv_heads, block_size, dim, generator=g).to(k.dtype)
    slots = torch.tensor([ids[p // block_size] * block_size + p % block_size for p in range(seq)])
    write_kv(k.transpose(0, 1), v.transpose(0, 1), pool_k, pool_v, slots)
    pool_k[0], pool_v[0] = float("nan"), float("nan")
    table = torch.tensor(ids)
    sink_blocks = math.ceil(sink / block_size)
    first_needed = max(0, first_query - window + 1) // block_size
    table[sink_blocks:first_needed] = 0  # freed, as the sink + window manager does
    return pool_k, pool_v, table


CASES = [  # (heads, kv_heads, dim, seq, q_len, sink, window, block_size)
    pytest.param(4, 2, 32, 100, 1, 4, 16, 16, id="decode-gqa2"),
    pytest.param(4, 1, 32, 257, 1, 4, 31, 32, id="decode-mqa-odd-window"),
    pytest.param(4, 4, 16, 113, 113, 4, 20, 16, id="prefill-whole-mha"),
    pytest.param(8, 2, 32, 300, 70, 0, 50, 32, id="chunk-no-sink"),
    pytest.param(4, 2, 32, 40, 40, 64, 8, 16, id="sink-longer-than-prompt"),
    pytest.param(4, 2, 32, 600, 600, 5, 64, 32, id="prefill-several-query-chunks"),
    pytest.param(2, 1, 32, 10, 3, 4, 1, 4, id="window-1"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads,kv_heads,dim,seq,q_len,sink,window,block_size", CASES)
def test_paged_matches_the_masked_reference(heads, kv_heads, dim, seq, q_len, sink, window, block_size, dtype):
    g = torch.Generator().manual_seed(seq + q_len)
    q = torch.randn(heads, q_len, dim, generator=g).to(dtype)
    k = torch.randn(kv_heads, seq, dim, generator=g).to(dtype)
    v = torch.randn(kv_heads, seq, dim, generator=g).to(dtype)
    scale = dim ** -0.5
    visible = streaming_mask(q_len, seq, sink=sink, window=window).expand(1, heads, q_len, seq)
    ref, _ = masked_attention(q[None], k[None], v[None], visible, scale)
    ref_low, _ = masked_attention(q[None], k[None], v[None], visible, scale, compute_dtype=dtype)
    pool_k, pool_v, table = _paged(k, v, block_size, sink=sink, first_query=seq - q_len, window=window, seed=seq)
    out = sink_window_paged_attention(q.transpose(0, 1), pool_k, pool_v, table, seq_len=seq, sink=sink,
                                      window=window, scale=scale, query_chunk=64)
    out, ref, ref_low = out.transpose(0, 1).float(), ref[0], ref_low[0]
    assert torch.isfinite(out).all(), "read a freed block"
    err = (out - ref).abs().max().item()
    limit = 2 * (ref_low - ref).abs().max().item() + (2e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps)
    assert err <= limit, f"max error {err:.3g} > {limit:.3g}"


def test_the_window_really_matters_in_these_cases():
    """The first case would pass with plain causal attention only if the mask did nothing: it does not."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(4, 1, 32, generator=g), torch.randn(2, 100, 32, generator=g), torch.randn(2, 100, 32, generator=g)
    causal = torch.ones(1, 4, 1, 100, dtype=torch.bool)
    dense, _ = masked_attention(q[None], k[None], v[None], causal, 32 ** -0.5)
    pool_k, pool_v, table = _paged(k, v, 16, sink=4, first_query=99, window=16, seed=1)
    table = torch.nan_to_num(table)
    out = sink_window_paged_attention(q.transpose(0, 1), pool_k, pool_v, table, seq_len=100, sink=4, window=16,
                                      scale=32 ** -0.5)
    assert (out.transpose(0, 1) - dense[0]).abs().max() > 1e-2


def test_write_kv_skips_padding_slots():
    key = torch.arange(3 * 1 * 2, dtype=torch.float32).view(3, 1, 2)
    k_cache, v_cache = torch.zeros(2, 1, 4, 2), torch.zeros(2, 1, 4, 2)
    write_kv(key, -key, k_cache, v_cache, torch.tensor([5, -1, 0]))
    assert torch.equal(k_cache[1, 0, 1], key[0, 0]) and torch.equal(k_cache[0, 0, 0], key[2, 0])
    assert torch.equal(v_cache[1, 0, 1], -key[0, 0]) and k_cache.count_nonzero() == 3
