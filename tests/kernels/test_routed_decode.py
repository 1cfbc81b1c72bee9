"""Routed decode kernel (per-(sequence, KV head) sink + window or full) vs the fp32 reference."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_error_policy import DEVICE, DTYPE_IDS, DTYPES, assert_within_policy
from lighttransfer.errors import LightTransferError
from lighttransfer.kernels import full_decode_reference, routed_decode, routed_decode_reference, use_reference
from lighttransfer.kernels.reference import masked_attention
from lighttransfer.kernels.routed_decode import routed_visibility


def _inputs(batch, kv_heads, group, n_keys, dim, dtype, seed, capacity=None):
    g = torch.Generator().manual_seed(seed)
    heads = kv_heads * group
    q = torch.randn(batch, 1, heads, dim, generator=g).to(DEVICE, dtype).transpose(1, 2)
    capacity = n_keys if capacity is None else capacity
    k, v = (torch.randn(batch, kv_heads, capacity, dim, generator=g).to(DEVICE, dtype)[:, :, :n_keys]
            for _ in range(2))
    return q, k, v


def _local(batch, kv_heads, seed):
    g = torch.Generator().manual_seed(seed)
    local = torch.rand(batch, kv_heads, generator=g) < 0.5
    local[0, 0], local[-1, -1] = True, False  # both kinds in every test
    return local.to(DEVICE)


def _check(q, k, v, local, dtype, what, *, sink, window, kv_start=None, n_valid=None, **kw):
    o = routed_decode(q, k, v, local, sink=sink, window=window, kv_start=kv_start, n_valid=n_valid, **kw)
    assert o.shape == q.shape and o.dtype == q.dtype
    ref = routed_decode_reference(q, k, v, local, sink=sink, window=window, kv_start=kv_start, n_valid=n_valid)
    visible = routed_visibility(q.shape[0], q.shape[1], k.shape[2], local, sink=sink, window=window,
                                kv_start=kv_start, n_valid=n_valid, device=q.device)
    low, _ = masked_attention(q, k, v, visible, 1 / math.sqrt(q.shape[-1]), compute_dtype=dtype)
    assert_within_policy(o, ref, low.to(dtype), dtype, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("group", [1, 3, 8], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("n_keys", [5, 40, 41, 42, 113, 301], ids=lambda n: f"N{n}")
def test_matches_reference(n_keys, group, dtype):
    """Edge lengths at sink 4 + window 37 = 41: below it (local = full), exactly at it, one past, far past."""
    q, k, v = _inputs(2, 2, group, n_keys, 32, dtype, seed=n_keys + group, capacity=n_keys + 7)
    _check(q, k, v, _local(2, 2, n_keys), dtype, f"N={n_keys} group={group}", sink=4, window=37, splits=3)


@pytest.mark.parametrize("sink", [0, 1, 4], ids=lambda s: f"sink{s}")
@pytest.mark.parametrize("splits", [1, 2, 7, 64], ids=lambda s: f"splits{s}")
def test_splits_and_sinks(splits, sink):
    """Forced split counts (one split, more splits than tiles; chunks wholly in the bulk of a local head)."""
    dtype = DTYPES[0]
    q, k, v = _inputs(2, 2, 4, 301, 32, dtype, seed=splits + sink)
    _check(q, k, v, _local(2, 2, splits), dtype, f"splits={splits} sink={sink}", sink=sink, window=33,
           splits=splits)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
def test_left_padding_moves_the_sinks(dtype):
    """kv_start per sequence: the sinks are the first real keys; padding spanning whole chunks."""
    q, k, v = _inputs(3, 2, 2, 257, 32, dtype, seed=7)
    kv_start = torch.tensor([0, 5, 200], device=DEVICE)
    local = torch.ones(3, 2, dtype=torch.bool, device=DEVICE)
    local[1, 1] = False
    _check(q, k, v, local, dtype, "padded", sink=4, window=16, kv_start=kv_start, splits=4)
    _check(q, k, v, local, dtype, "padded int32", sink=4, window=16, kv_start=kv_start.to(torch.int32), splits=4)


def test_all_full_equals_full_decode_and_all_local_equals_streaming():
    """Every head full: dense decoding; every head local: the sink + window rule of the streaming layers (fp32
    everywhere: the tolerances are fp32's; half precision is the policy tests' job)."""
    dtype = torch.float32
    q, k, v = _inputs(2, 2, 4, 200, 32, dtype, seed=11)
    full = torch.zeros(2, 2, dtype=torch.bool, device=DEVICE)
    o = routed_decode(q, k, v, full, sink=4, window=32, splits=5)
    torch.testing.assert_close(o, full_decode_reference(q, k, v), atol=2e-5, rtol=1e-4)
    o = routed_decode(q, k, v, ~full, sink=4, window=32, splits=5)
    near = torch.cat([k[:, :, :4], k[:, :, -32:]], dim=2), torch.cat([v[:, :, :4], v[:, :, -32:]], dim=2)
    torch.testing.assert_close(o, full_decode_reference(q, *near), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("n_valid", [1, 30, 45, 300], ids=lambda n: f"valid{n}")
def test_device_length(n_valid):
    """``n_valid`` in device memory (a static step): the window ends at ``n_valid``, storage beyond is never
    read on the Triton path (NaN there stays out). fp32 everywhere: the tolerances are fp32's."""
    dtype = torch.float32
    q, k, v = _inputs(2, 2, 2, 301, 32, dtype, seed=n_valid)
    length = torch.tensor([n_valid], device=DEVICE, dtype=torch.int32)
    local = _local(2, 2, n_valid)
    want = routed_decode_reference(q, k[:, :, :n_valid], v[:, :, :n_valid], local, sink=4, window=16)
    torch.testing.assert_close(routed_decode_reference(q, k, v, local, sink=4, window=16, n_valid=length), want)
    k, v = k.clone(), v.clone()
    k[:, :, n_valid:], v[:, :, n_valid:] = float("nan"), float("nan")
    got = routed_decode(q, k, v, local, sink=4, window=16, n_valid=length, splits=4)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_reference_switch_and_bad_input():
    dtype = DTYPES[0]
    q, k, v = _inputs(1, 2, 2, 50, 16, dtype, seed=1)
    local = torch.tensor([[True, False]], device=DEVICE)
    with use_reference():
        a = routed_decode(q, k, v, local, sink=2, window=8)
    torch.testing.assert_close(a, routed_decode_reference(q, k, v, local, sink=2, window=8))
    with pytest.raises(LightTransferError, match="local must be bool"):
        routed_decode(q, k, v, local.long(), sink=2, window=8)
    with pytest.raises(LightTransferError, match="one query"):
        routed_decode(q.expand(1, 4, 2, 16), k, v, local, sink=2, window=8)
    with pytest.raises(LightTransferError, match="window"):
        routed_decode(q, k, v, local, sink=2, window=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: DTYPE_IDS[d])
def test_cuda_graph_replays_any_routing(dtype):
    """Captured once, replayed with new routing flags and a new device length: the reference's result each time."""
    q, k, v = _inputs(4, 8, 4, 4096, 128, dtype, seed=3)
    local = torch.zeros(4, 8, dtype=torch.bool, device="cuda")
    n_valid = torch.tensor([2000], dtype=torch.int32, device="cuda")
    routed_decode(q, k, v, local, sink=4, window=1020, n_valid=n_valid)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = routed_decode(q, k, v, local, sink=4, window=1020, n_valid=n_valid)
    for seed, n in ((1, 2000), (2, 4096), (3, 1500)):
        local.copy_(torch.rand(4, 8, generator=torch.Generator().manual_seed(seed)).cuda() < 0.5)
        n_valid.fill_(n)
        graph.replay()
        want = routed_decode_reference(q, k, v, local, sink=4, window=1020, n_valid=n_valid)
        torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=2e-2)



@pytest.mark.parametrize("batch, n_keys", [(1, 32768), (16, 32768), (16, 131072), (1, 131072), (50, 32768),
                                           (4, 2000), (1, 100)])
def test_split_plan_spreads_the_full_pairs_without_small_chunks(batch, n_keys):
    """On 132 SMs with 8 KV heads: never fewer splits than the wave plan; more only as far as the spread rule asks,
    the fewest for ROUTED_WAVES waves of programs, capped at one split per ROUTED_CHUNK keys; the H200 sweep's
    picks at 32k (9 at batch 16, where 32 cost +9% with every pair full; 32 at batch 1)."""
    from lighttransfer.kernels.decode_triton import plan_wave_splits
    from lighttransfer.kernels.routed_decode_triton import ROUTED_CHUNK, ROUTED_WAVES, routed_splits

    splits = routed_splits(batch, 8, n_keys, 132)
    wave = plan_wave_splits(batch, 8, n_keys, 132)[1]
    assert splits >= wave >= 1
    if splits > wave:
        floor = -(-n_keys // ROUTED_CHUNK)
        assert splits <= floor
        assert splits == floor or batch * 8 * (splits - 1) < ROUTED_WAVES * 132 <= batch * 8 * splits
    expected = {(16, 32768): 9, (1, 32768): 32, (1, 131072): 128, (16, 131072): 9}
    if (batch, n_keys) in expected:
        assert splits == expected[batch, n_keys]
