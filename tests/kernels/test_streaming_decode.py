"""Triton decode kernel vs the fp32 reference over ring-buffer slot orders, empty slots, GQA and splits."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_error_policy import DEVICE, DTYPE_IDS, DTYPES, assert_within_policy
from lighttransfer.errors import LightTransferError
from lighttransfer.kernels import (
    MAX_HEAD_DIM,
    streaming_attention_reference,
    streaming_decode,
    streaming_decode_reference,
)
from lighttransfer.kernels.reference import decode_visibility, masked_attention


def ring_slot_positions(tokens: int, sink: int, window: int) -> torch.Tensor:
    """Slot positions ``[sink + window]`` of a streaming cache after ``tokens`` tokens (-1 = never written):
    positions ``< sink`` stay in their own slot, later position ``p`` lands in ring slot ``(p - sink) % window``."""
    slots = torch.full((sink + window,), -1, dtype=torch.long)
    for p in range(tokens):
        slots[p if p < sink else sink + (p - sink) % window] = p
    return slots


def _inputs(batch, heads, kv_heads, nq, slots, dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, nq, dim, generator=g).to(DEVICE, dtype)
    k, v = (torch.randn(batch, kv_heads, slots, dim, generator=g).to(DEVICE, dtype) for _ in range(2))
    return q, k, v


def _check(q, k, v, slot_pos, q_pos, dtype, what, **kw):
    o = streaming_decode(q, k, v, slot_pos, q_pos, **kw)
    assert o.shape == q.shape and o.dtype == q.dtype
    ref = streaming_decode_reference(q, k, v, slot_pos, q_pos, **kw)
    visible = decode_visibility(q.shape[1], slot_pos, q_pos, sink=kw["sink"], window=kw["window"],
                                stream_heads=kw.get("stream_heads"))
    low, _ = masked_attention(q, k, v, visible, 1 / math.sqrt(q.shape[-1]), compute_dtype=dtype)
    assert_within_policy(o, ref, low.to(dtype), dtype, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("group", [1, 2, 4], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("tokens", [5, 40, 203], ids=lambda t: f"after{t}")
def test_ring_buffer_cache(tokens, group, dtype):
    """One new token per sequence against the runtime's layout: sink slots, then a (possibly wrapped) ring."""
    sink, window, kv_heads, dim = 4, 28, 2, 32
    q, k, v = _inputs(2, kv_heads * group, kv_heads, 1, sink + window, dim, dtype, seed=tokens + group)
    # the second sequence is 3 tokens shorter: per-sequence positions
    slot_pos = torch.stack([ring_slot_positions(tokens, sink, window),
                            ring_slot_positions(max(tokens - 3, 1), sink, window)]).to(DEVICE)
    q_pos = torch.tensor([[tokens - 1], [max(tokens - 3, 1) - 1]], device=DEVICE)
    _check(q, k, v, slot_pos, q_pos, dtype, f"tokens={tokens}", sink=sink, window=window)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("dim", [128, MAX_HEAD_DIM], ids=lambda d: f"D{d}")
def test_largest_head_dims(dim, dtype):
    """head_dim up to the claimed limit (``MAX_HEAD_DIM``, Gemma 3's 256) through the ring-buffer decode."""
    sink, window, kv_heads, tokens = 4, 28, 1, 50
    q, k, v = _inputs(2, 2 * kv_heads, kv_heads, 1, sink + window, dim, dtype, seed=dim)
    slot_pos = torch.stack([ring_slot_positions(tokens, sink, window)] * 2).to(DEVICE)
    q_pos = torch.tensor([[tokens - 1], [tokens - 1]], device=DEVICE)
    _check(q, k, v, slot_pos, q_pos, dtype, f"D={dim}", sink=sink, window=window)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("splits", [1, 2, 5], ids=lambda s: f"splits{s}")
def test_speculative_queries_shuffled_slots_and_splits(splits, dtype):
    """nq = 3 queries, slots in random order with holes, int32 positions, forced flash-decoding splits."""
    from lighttransfer.kernels import switch

    sink, window, slots = 3, 60, 80
    q, k, v = _inputs(2, 8, 2, 3, slots, 16, dtype, seed=splits)
    g = torch.Generator().manual_seed(splits)
    slot_pos = torch.stack([torch.randperm(slots, generator=g) + 100 for _ in range(2)])
    slot_pos[0, ::7] = -1
    slot_pos = slot_pos.to(DEVICE, torch.int32)
    q_pos = torch.tensor([[170, 175, 179], [150, 151, 152]], device=DEVICE)
    kw = dict(sink=sink, window=window)
    if switch.triton_runs_on(q):
        from lighttransfer.kernels.decode_triton import streaming_decode_triton

        o = streaming_decode_triton(q, k, v, slot_pos, q_pos, scale=16**-0.5, stream_heads=None, splits=splits,
                                    **kw)
        ref = streaming_decode_reference(q, k, v, slot_pos, q_pos, **kw)
        low, _ = masked_attention(q, k, v, decode_visibility(8, slot_pos, q_pos, **kw), 0.25, compute_dtype=dtype)
        assert_within_policy(o, ref, low.to(dtype), dtype, f"splits={splits}")
    _check(q, k, v, slot_pos, q_pos, dtype, "planned splits", **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
def test_mixed_heads_and_empty_rows(dtype):
    """Full heads see every filled causal slot; a sequence with an empty cache gets zeros, not nan."""
    sink, window = 2, 6
    q, k, v = _inputs(2, 4, 2, 2, 40, 64, dtype, seed=3)
    slot_pos = torch.arange(40).repeat(2, 1)
    slot_pos[1] = -1
    q_pos = torch.tensor([[38, 39], [0, 1]])
    heads = torch.tensor([True, False, False, True])
    _check(q, k, v, slot_pos.to(DEVICE), q_pos.to(DEVICE), dtype, "mixed", sink=sink, window=window,
           stream_heads=heads.to(DEVICE))
    o = streaming_decode(q, k, v, slot_pos.to(DEVICE), q_pos.to(DEVICE), sink=sink, window=window)
    assert torch.equal(o[1], torch.zeros_like(o[1]))


def test_decode_matches_prefill_on_the_last_token():
    """A cache holding the sink + window of a sequence gives the prefill result of its last query."""
    dtype = torch.float32
    sink, window, n = 4, 16, 50
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, n, 32, generator=g).to(DEVICE, dtype)
    k, v = (torch.randn(1, 2, n, 32, generator=g).to(DEVICE, dtype) for _ in range(2))
    prefill = streaming_attention_reference(q, k, v, sink=sink, window=window)[:, :, -1:]
    slot_pos = ring_slot_positions(n, sink, window)
    cache_k = torch.zeros(1, 2, sink + window, 32, device=DEVICE, dtype=dtype)
    cache_v = torch.zeros_like(cache_k)
    cache_k[:, :, :] = k[:, :, slot_pos]
    cache_v[:, :, :] = v[:, :, slot_pos]
    o = streaming_decode(q[:, :, -1:], cache_k, cache_v, slot_pos[None].to(DEVICE), torch.tensor([[n - 1]]).to(DEVICE),
                         sink=sink, window=window)
    torch.testing.assert_close(o.float(), prefill.float(), atol=2e-5, rtol=1e-4)


def test_bad_slot_positions_shape_is_one_clear_error():
    q = torch.randn(1, 2, 1, 16)
    k = v = torch.randn(1, 1, 8, 16)
    with pytest.raises(LightTransferError, match="slot_pos"):
        streaming_decode(q, k, v, torch.zeros(1, 7, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long),
                         sink=1, window=4)
