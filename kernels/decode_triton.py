"""Triton kernels for decode attention over a slot cache (flash-decoding split along the slots).

The cache holds ``C`` slots per sequence and KV head; ``slot_pos[b, c]`` is the absolute position of the token
in slot ``c`` (-1 = empty). Visibility is computed from positions only, so any slot order works (sink slots
then a ring buffer, or anything else). One program takes one (sequence, KV head) and one chunk of slots, and
handles all ``GROUP * nq`` query rows of that KV head together, so each K/V tile is read once per KV head.
When one chunk would leave the GPU idle (batch 1), the slots are split over several programs whose partial
results a second kernel merges by log-sum-exp.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .decode_launch import (
    FALLBACK_CONFIG,
    INTERPRETER_CONFIG,
    autotune_enabled,
    capability,
    decode_config,
    device_index,
    fits_hopper,
    multiprocessors,
    tuned_launcher,
)

_UNBOUNDED = tl.constexpr(1 << 30)
_LOG2E = 1.4426950408889634
# Split granularity on CUDA: every chunk is a multiple of the largest BLOCK_N of the candidates, so a tile never
# straddles two chunks (the interpreter's tiles are 16 wide).
_CHUNK_ALIGN = 128


@triton.jit
def _streaming_decode_split(
    Q, K, V, SLOT_POS, Q_POS, STREAM_HEADS, Out, PART_O, PART_LSE,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kc,
    stride_vb, stride_vh, stride_vc,
    stride_sb, stride_sc,
    stride_pb, stride_pn,
    stride_ob, stride_oh, stride_on,
    n_kv_heads, GROUP, NQ, n_slots, chunk, n_splits, sink, window, qk_scale,
    HAS_STREAM_HEADS: tl.constexpr, SINGLE_SPLIT: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_bk = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bk // n_kv_heads
    hk = pid_bk % n_kv_heads

    # row m of the tile = query head hk * GROUP + m // NQ, query t = m % NQ
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < GROUP * NQ
    d_ok = offs_d < HEAD_DIM
    h = hk * GROUP + offs_m // NQ
    t = offs_m % NQ
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = tl.load(Q_POS + b.to(tl.int64) * stride_pb + t * stride_pn, mask=row_ok, other=-1).to(tl.int32)
    if HAS_STREAM_HEADS:
        streaming = tl.load(STREAM_HEADS + h, mask=row_ok, other=1) != 0
        sink_r = tl.where(streaming, sink, _UNBOUNDED)
        win_r = tl.where(streaming, window, _UNBOUNDED)
    else:
        sink_r = sink + tl.zeros([BLOCK_M], tl.int32)
        win_r = window + tl.zeros([BLOCK_M], tl.int32)

    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    s_base = SLOT_POS + b.to(tl.int64) * stride_sb

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo = pid_s * chunk
    hi = tl.minimum(lo + chunk, n_slots)
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        pos = tl.load(s_base + offs_n * stride_sc, mask=n_ok, other=-1).to(tl.int32)
        k = tl.load(k_base + offs_n[None, :] * stride_kc + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None],
                    other=0.0)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION)
        rel = q_pos[:, None] - pos[None, :]
        visible = (pos[None, :] >= 0) & (rel >= 0) & ((pos[None, :] < sink_r[:, None]) | (rel < win_r[:, None]))
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vc + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    out_mask = row_ok[:, None] & d_ok[None, :]
    if SINGLE_SPLIT:
        o_ptrs = Out + b.to(tl.int64) * stride_ob + h[:, None] * stride_oh + t[:, None] * stride_on + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=out_mask)
    else:
        # partials [B, H, NQ, n_splits, BLOCK_D] fp32 and their log2-sum-exp [B, H, NQ, n_splits]
        row = (b * n_kv_heads * GROUP + h) * NQ + t
        part = row.to(tl.int64) * n_splits + pid_s
        tl.store(PART_O + part[:, None] * BLOCK_D + offs_d[None, :], out, mask=out_mask)
        lse2 = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(PART_LSE + part, lse2, mask=row_ok)


@triton.jit
def _streaming_decode_merge(
    PART_O, PART_LSE, Out, H, NQ, n_splits,
    stride_ob, stride_oh, stride_on,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0)  # flat (b, h, t)
    t = row % NQ
    h = (row // NQ) % H
    b = row // (NQ * H)
    offs_d = tl.arange(0, BLOCK_D)
    out = _merge_partials(PART_O, PART_LSE, row, n_splits, n_splits, BLOCK_D, BLOCK_S)
    o_ptrs = Out + b.to(tl.int64) * stride_ob + h * stride_oh + t * stride_on + offs_d
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)


@triton.jit
def _merge_partials(PART_O, PART_LSE, row, n_splits, n_used, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Row ``row``'s output ``[BLOCK_D]`` float32 from the first ``n_used`` of its ``n_splits`` partials (normalized
    outputs and log2-sum-exps, ``-inf`` for a partial that saw no key); zeros where none saw a key."""
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < n_used
    lse = tl.load(PART_LSE + row.to(tl.int64) * n_splits + offs_s, mask=s_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.math.exp2(lse - top)
    parts = tl.load(PART_O + (row.to(tl.int64) * n_splits + offs_s[:, None]) * BLOCK_D + offs_d[None, :],
                    mask=s_ok[:, None], other=0.0)
    total = tl.sum(w, 0)
    return tl.sum(parts * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)


# --------------------------------------------------------------------------------------------------- configs
HOPPER_CONFIGS = [
    decode_config(64, 4, 3),
    decode_config(128, 4, 3),
    decode_config(64, 4, 4),
    decode_config(128, 8, 3),
    decode_config(32, 4, 4),
]
@functools.cache
def _tuned_launcher(capability: tuple[int, int], block_d: int, block_m: int, autotune: bool,
                    element_bytes: int = 2):
    return tuned_launcher(_streaming_decode_split, HOPPER_CONFIGS, capability, block_d, block_m, autotune,
                          element_bytes)


def plan_splits(batch: int, kv_heads: int, n_slots: int, programs_wanted: int, align: int = _CHUNK_ALIGN,
                splits: int | None = None) -> tuple[int, int]:
    """``(chunk, n_splits)``: slots per program (a multiple of ``align``) so that about ``programs_wanted``
    programs run, or about ``splits`` chunks per (sequence, KV head) when given."""
    if splits is None:
        splits = triton.cdiv(programs_wanted, batch * kv_heads)
    splits = max(1, min(splits, triton.cdiv(n_slots, align)))
    chunk = triton.cdiv(triton.cdiv(n_slots, splits), align) * align
    return chunk, triton.cdiv(n_slots, chunk)


WAVE_FILL = 0.96  # the last wave's fill at which more splits stop paying (see plan_wave_splits)


def wave_efficiency(programs: int, slots: int) -> float:
    """Share of the last wave's slots that work: ``programs / slots`` waves over the whole waves they take."""
    waves = programs / slots
    return waves / math.ceil(waves)


def plan_wave_splits(batch: int, kv_heads: int, n_slots: int, slots: int, align: int = _CHUNK_ALIGN,
                     splits: int | None = None, widest: int = 4, most: int = 16,
                     fill: float = WAVE_FILL) -> tuple[int, int]:
    """``(chunk, n_splits)`` for a kernel of which ``slots`` programs run at once: the fewest splits whose programs
    fill their last wave to at least ``fill``, else (none does) the best-filling one, searched from one split up
    to ``widest`` times the plain plan (:func:`plan_splits` with ``2 * slots`` programs wanted) or ``most``,
    whichever is more.

    A memory-bound kernel whose tiles take most of an SM's shared memory runs one program per SM, so a grid of
    ``6.06`` waves takes 7 and leaves 13% of the GPU idle: on the H200's 132 SMs, 50 sequences x 8 KV heads x 2
    chunks. Each split adds a program's start-up and a partial result to merge, so the fewest that fill the
    waves win: measured on an H200 (``bench/results/decode_floor_h200/split_sweep``), the full-layer kernel over
    50 x 32768 keys took 1535 us at 4 splits (93% fill), 1488 us at 7 (96%) and 1491 us at 13 (98.5%); batch 1 at
    16384 keys 22.4 us at 16 splits (one wave, 97%) against 26.2 us at 32 (two waves, 97%); 97 x 16384 keys
    1397 us at one split (98%) against 1463 us at 9 (99.8%). ``splits`` (given) is kept as it is.
    """
    chunk, n_splits = plan_splits(batch, kv_heads, n_slots, 2 * slots, align=align, splits=splits)
    if splits is not None:
        return chunk, n_splits
    units = batch * kv_heads
    plans = sorted({plan_splits(batch, kv_heads, n_slots, 0, align=align, splits=s)
                    for s in range(1, max(widest * n_splits, most) + 1)}, key=lambda p: p[1])
    for plan in plans:
        if wave_efficiency(units * plan[1], slots) >= fill:
            return plan
    best = max(wave_efficiency(units * n, slots) for _, n in plans)
    return next(p for p in plans if wave_efficiency(units * p[1], slots) >= best - 0.005)


def streaming_decode_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_pos: torch.Tensor,
    q_pos: torch.Tensor,
    *,
    sink: int,
    window: int,
    scale: float,
    stream_heads: torch.Tensor | None,
    splits: int | None = None,
) -> torch.Tensor:
    """Launch the decode kernels on validated inputs (see ``streaming_decode``); ``splits`` overrides the plan."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1:
        k_cache = k_cache.contiguous()
    if v_cache.stride(-1) != 1:
        v_cache = v_cache.contiguous()
    batch, heads, nq, dim = q.shape
    kv_heads, n_slots = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    o = torch.empty((batch, heads, nq, dim), dtype=q.dtype, device=q.device)
    block_d = max(16, triton.next_power_of_2(dim))
    block_m = max(16, triton.next_power_of_2(group * nq))
    if q.is_cuda:
        wanted = 2 * multiprocessors(device_index(q))
        chunk, n_splits = plan_splits(batch, kv_heads, n_slots, wanted, splits=splits)
    else:
        align = INTERPRETER_CONFIG.kwargs["BLOCK_N"]
        chunk, n_splits = plan_splits(batch, kv_heads, n_slots, 1, align=align, splits=splits)
    single = n_splits == 1
    slot_pos = slot_pos.to(q.device)
    q_pos = q_pos.to(q.device)
    modes = None if stream_heads is None else stream_heads.to(device=q.device, dtype=torch.int8).contiguous()
    if single:
        part_o = part_lse = o
    else:
        part_o = torch.empty((batch, heads, nq, n_splits, block_d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, heads, nq, n_splits), dtype=torch.float32, device=q.device)
    args = (
        q, k_cache, v_cache, slot_pos, q_pos, modes if modes is not None else o, o, part_o, part_lse,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        slot_pos.stride(0), slot_pos.stride(1),
        q_pos.stride(0), q_pos.stride(1),
        o.stride(0), o.stride(1), o.stride(2),
        kv_heads, group, nq, n_slots, chunk, n_splits, sink, window, scale * _LOG2E,
    )
    flags = dict(
        HAS_STREAM_HEADS=modes is not None, SINGLE_SPLIT=single, HEAD_DIM=dim, BLOCK_D=block_d, BLOCK_M=block_m,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    grid = (batch * kv_heads, n_splits)

    def launch(split_kernel, extra: dict):
        split_kernel[grid](*args, **flags, **extra)
        if not single:
            _streaming_decode_merge[(batch * heads * nq,)](
                part_o, part_lse, o, heads, nq, n_splits, o.stride(0), o.stride(1), o.stride(2),
                HEAD_DIM=dim, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(n_splits)),
            )

    if not q.is_cuda:
        launch(_streaming_decode_split, INTERPRETER_CONFIG.kwargs)
        return o
    # decode at batch 1 is host-bound: no per-call device queries or context switches unless needed
    index = device_index(q)
    kernel = _tuned_launcher(capability(index), block_d, block_m, autotune_enabled(), q.element_size())
    if index == torch.cuda.current_device():
        launch(kernel, {})
    else:
        with torch.cuda.device(index):
            launch(kernel, {})
    return o


__all__ = ["streaming_decode_triton", "plan_splits", "plan_wave_splits", "wave_efficiency", "HOPPER_CONFIGS", "FALLBACK_CONFIG", "fits_hopper"]
