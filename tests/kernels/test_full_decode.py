"""Full-layer decode kernel (one query per sequence, contiguous cache, left padding) vs the fp32 reference."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_error_policy import DEVICE, DTYPE_IDS, DTYPES, assert_within_policy
from lighttransfer.errors import LightTransferError
from lighttransfer.kernels import (
    full_decode,
    full_decode_reference,
    streaming_decode_reference,
    use_reference,
)
from lighttransfer.kernels.reference import full_decode_visibility, masked_attention


def _inputs(batch, kv_heads, group, n_keys, dim, dtype, seed, capacity=None):
    """q ``[B, H, 1, D]`` as the runtime passes it (a transposed view), K/V views of the first ``n_keys`` tokens
    of larger storage, as the full cache layer returns them."""
    g = torch.Generator().manual_seed(seed)
    heads = kv_heads * group
    q = torch.randn(batch, 1, heads, dim, generator=g).to(DEVICE, dtype).transpose(1, 2)
    capacity = n_keys if capacity is None else capacity
    k, v = (torch.randn(batch, kv_heads, capacity, dim, generator=g).to(DEVICE, dtype)[:, :, :n_keys]
            for _ in range(2))
    return q, k, v


def _check(q, k, v, dtype, what, kv_start=None, **kw):
    o = full_decode(q, k, v, kv_start=kv_start, **kw)
    assert o.shape == q.shape and o.dtype == q.dtype
    ref = full_decode_reference(q, k, v, kv_start=kv_start)
    visible = full_decode_visibility(q.shape[0], q.shape[1], k.shape[2], kv_start, device=q.device)
    low, _ = masked_attention(q, k, v, visible, 1 / math.sqrt(q.shape[-1]), compute_dtype=dtype)
    assert_within_policy(o, ref, low.to(dtype), dtype, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("group", [1, 4, 8], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("n_keys", [1, 113, 1023, 2049], ids=lambda n: f"N{n}")
def test_matches_reference(n_keys, group, dtype):
    """Awkward key lengths (1, not a multiple of any tile), GQA ratios, views into larger storage."""
    q, k, v = _inputs(1, 2, group, n_keys, 32, dtype, seed=n_keys + group, capacity=n_keys + 7)
    _check(q, k, v, dtype, f"N={n_keys} group={group}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("n_keys", [113, 1023], ids=lambda n: f"N{n}")
def test_left_padded_batch(n_keys, dtype):
    """Batch 3: no padding, padding inside the first tile, padding spanning whole tiles and splits."""
    q, k, v = _inputs(3, 2, 4, n_keys, 32, dtype, seed=3 * n_keys)
    kv_start = torch.tensor([0, 5, n_keys - 40], device=DEVICE)
    _check(q, k, v, dtype, f"N={n_keys} padded", kv_start=kv_start)
    _check(q, k, v, dtype, f"N={n_keys} padded int32", kv_start=kv_start.to(torch.int32))


@pytest.mark.parametrize("splits", [1, 2, 5, 64], ids=lambda s: f"splits{s}")
def test_split_counts_merge_to_the_same_result(splits):
    """Forced split counts, including more splits than tiles and splits that see only padding."""
    dtype = DTYPES[0]
    q, k, v = _inputs(2, 1, 4, 301, 32, dtype, seed=splits)
    kv_start = torch.tensor([0, 250], device=DEVICE)
    _check(q, k, v, dtype, f"splits={splits}", kv_start=kv_start, splits=splits)


@pytest.mark.parametrize("n_valid", [1, 64, 113, 300], ids=lambda n: f"valid{n}")
def test_a_device_length_hides_the_reserved_storage(n_valid):
    """``n_valid`` in device memory over storage of 301 keys (what a CUDA-graph step reads): the same result as a
    view of the first ``n_valid`` keys; the Triton path never reads beyond them (NaN there stays out), with the
    grid planned for the whole storage."""
    dtype = DTYPES[0]
    q, k, v = _inputs(2, 2, 4, 301, 32, dtype, seed=n_valid)
    kv_start = torch.tensor([0, min(9, n_valid - 1)], device=DEVICE)
    length = torch.tensor([n_valid], device=DEVICE, dtype=torch.int32)
    want = full_decode_reference(q, k[:, :, :n_valid], v[:, :, :n_valid], kv_start=kv_start)
    torch.testing.assert_close(full_decode_reference(q, k, v, kv_start=kv_start, n_valid=length), want)
    k, v = k.clone(), v.clone()
    k[:, :, n_valid:], v[:, :, n_valid:] = float("nan"), float("nan")
    got = full_decode(q, k, v, kv_start=kv_start, n_valid=length, splits=5)
    _check(q, k[:, :, :n_valid], v[:, :, :n_valid], dtype, f"n_valid={n_valid}", kv_start=kv_start)
    torch.testing.assert_close(got, full_decode(q, k[:, :, :n_valid], v[:, :, :n_valid], kv_start=kv_start),
                               atol=2e-5, rtol=2e-5)


def test_head_dim_not_a_power_of_two():
    dtype = DTYPES[0]
    q, k, v = _inputs(2, 2, 2, 77, 24, dtype, seed=5)
    _check(q, k, v, dtype, "D=24", kv_start=torch.tensor([0, 3], device=DEVICE))


def test_a_sequence_that_sees_no_key_gets_zeros():
    dtype = DTYPES[0]
    q, k, v = _inputs(2, 1, 2, 40, 16, dtype, seed=6)
    o = full_decode(q, k, v, kv_start=torch.tensor([0, 40], device=DEVICE))
    assert torch.equal(o[1], torch.zeros_like(o[1]))
    assert not torch.isnan(o).any()


def test_equals_the_slot_kernels_reference_with_contiguous_positions():
    """The same attention as the streaming decode rule with an unbounded window and positions j - kv_start."""
    q, k, v = _inputs(2, 2, 2, 50, 16, torch.float32, seed=7)
    kv_start = torch.tensor([0, 9], device=DEVICE)
    pos = torch.arange(50, device=DEVICE).view(1, 50) - kv_start.view(2, 1)
    slot_pos = torch.where(pos >= 0, pos, torch.full_like(pos, -1))
    q_pos = (49 - kv_start).view(2, 1)
    want = streaming_decode_reference(q, k, v, slot_pos, q_pos, sink=0, window=1 << 30)
    torch.testing.assert_close(full_decode_reference(q, k, v, kv_start=kv_start), want)


def test_use_reference_forces_the_reference(monkeypatch):
    import lighttransfer.kernels.full as entry

    calls = []
    monkeypatch.setattr(entry, "full_decode_reference",
                        lambda *a, **kw: calls.append("ref") or full_decode_reference(*a, **kw))
    q, k, v = _inputs(1, 1, 2, 10, 16, torch.float32, seed=8)
    with use_reference():
        entry.full_decode(q, k, v)
    assert calls == ["ref"]


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(q_len=2), "one query"),
        (dict(kv_heads=3), "KV heads must divide"),
        (dict(kv_start=torch.zeros(3, dtype=torch.long)), "kv_start"),
        (dict(n_valid=torch.tensor([3.0])), "n_valid"),
    ],
    ids=["two-queries", "heads-not-divisible", "kv-start-shape", "n-valid-dtype"],
)
def test_bad_input_is_one_clear_error(bad, message):
    q = torch.randn(2, 4, bad.pop("q_len", 1), 16)
    k = v = torch.randn(2, bad.pop("kv_heads", 2), 5, 16)
    with pytest.raises(LightTransferError, match=message):
        full_decode(q, k, v, **bad)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize(
    "batch, kv_heads, group, n_keys, dim",
    [(1, 8, 4, 16384 + 37, 128), (4, 8, 4, 4097, 128), (2, 2, 8, 32768 - 5, 128), (3, 4, 1, 2049, 64),
     (64, 8, 4, 1023, 128)],
    ids=["llama8b-16k-b1", "llama8b-4k-b4", "gqa8-32k", "mha-2k-D64", "llama8b-1k-b64"],
)
def test_realistic_shapes_on_gpu(batch, kv_heads, group, n_keys, dim, dtype):
    """Shapes of a Llama-3-8B full layer (32 query / 8 KV heads, D=128): many splits at batch 1, one at large
    batch, padding on every other sequence."""
    q, k, v = _inputs(batch, kv_heads, group, n_keys, dim, dtype, seed=n_keys, capacity=n_keys + 256)
    kv_start = torch.tensor([(b % 2) * (b * 37 % 500) for b in range(batch)], device=DEVICE)
    _check(q, k, v, dtype, f"B={batch} N={n_keys}", kv_start=kv_start)


@pytest.mark.parametrize("module", ["decode_triton", "full_decode_triton"])
def test_the_tuned_launchers_keep_only_configs_that_fit(module):
    """The host side of both decode kernels (no launch): Hopper candidates filtered by shared memory, the fallback
    elsewhere, one candidate with autotuning off."""
    import importlib

    from lighttransfer.kernels.decode_launch import FALLBACK_CONFIG, fits_hopper

    mod = importlib.import_module(f"lighttransfer.kernels.{module}")
    hopper = mod._tuned_launcher((9, 0), 128, 16, True)
    assert [str(c) for c in hopper.configs] == [str(c) for c in mod.HOPPER_CONFIGS if fits_hopper(c, 128, 16)]
    assert [str(c) for c in mod._tuned_launcher((8, 0), 128, 16, True).configs] == [str(FALLBACK_CONFIG)]
    assert len(mod._tuned_launcher((9, 0), 256, 16, False).configs) == 1
    big = mod._tuned_launcher((9, 0), 256, 64, True)
    assert all(c.kwargs["BLOCK_N"] <= 64 for c in big.configs)


@pytest.mark.parametrize("module", ["decode_triton", "full_decode_triton"])
@pytest.mark.parametrize("capability, limit", [((9, 0), 227 * 1024), ((8, 6), 99 * 1024)], ids=["hopper", "other"])
def test_fp32_tiles_are_sized_by_their_element_size(module, capability, limit):
    """fp32 tiles take twice the shared memory of bf16 ones: at head size 256 even the bf16 fallback (278 KB in
    fp32, what an H200 refused) must give way to smaller tiles, on Hopper and on the 99 KB of other GPUs."""
    import importlib

    from lighttransfer.kernels.decode_launch import FALLBACK_CONFIG, shared_memory

    mod = importlib.import_module(f"lighttransfer.kernels.{module}")
    assert shared_memory(FALLBACK_CONFIG, 256, 16, 4) > 227 * 1024  # the config that failed
    for block_m in (16, 64):
        configs = mod._tuned_launcher(capability, 256, block_m, True, 4).configs
        assert configs and all(shared_memory(c, 256, block_m, 4) <= limit for c in configs)
        bf16 = mod._tuned_launcher(capability, 256, block_m, True, 2).configs
        assert max(shared_memory(c, 256, block_m, 2) for c in bf16) <= limit


@pytest.mark.parametrize("batch, n_keys", [(50, 32768), (25, 32768), (51, 16384), (1, 16384), (97, 16384), (3, 700)])
def test_wave_planner_takes_the_fewest_splits_that_fill_the_waves_and_covers_every_key(batch, n_keys):
    """On 132 SMs, one program each at a time: the chosen split count is the fewest whose programs fill their waves
    to WAVE_FILL (50 x 8 KV heads x 2 chunks is 6.06 waves, 87%; 7 chunks, 96%), else fills them at least as well
    as the plain plan; the chunks are aligned and cover the keys; a given split count is kept."""
    from lighttransfer.kernels.decode_triton import WAVE_FILL, plan_splits, plan_wave_splits, wave_efficiency

    plain = plan_splits(batch, 8, n_keys, 264, align=256)
    chunk, n_splits = plan_wave_splits(batch, 8, n_keys, 132, align=256)
    assert chunk % 256 == 0 and (n_splits - 1) * chunk < n_keys <= n_splits * chunk
    fills = wave_efficiency(batch * 8 * n_splits, 132)
    if fills >= WAVE_FILL:
        assert all(wave_efficiency(batch * 8 * s, 132) < WAVE_FILL for s in range(1, n_splits))
    else:
        assert fills >= wave_efficiency(batch * 8 * plain[1], 132)
    expected = {(50, 32768): 7, (25, 32768): 7, (1, 16384): 16, (97, 16384): 1}  # the H200 sweep's fastest
    if (batch, n_keys) in expected:
        assert n_splits == expected[batch, n_keys]
    assert plan_wave_splits(batch, 8, n_keys, 132, align=256, splits=2) == plan_splits(batch, 8, n_keys, 0,
                                                                                      align=256, splits=2)
