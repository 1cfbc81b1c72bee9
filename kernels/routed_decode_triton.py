"""Triton kernel for routed decode attention (:func:`~lighttransfer.kernels.routed_decode`): the split-K kernel of
:mod:`.full_decode_triton`, whose programs clip their key chunk to what their (sequence, KV head) is routed to.

One program takes one (sequence, KV head) and one chunk ``[lo, hi)`` of keys, for all ``GROUP`` query heads of that
KV head. A full-routed head attends the whole chunk. A local-routed head attends the chunk's intersection with the
sink ``[kv_start, kv_start + sink)`` and, separately, with the window ``[max(n - window, kv_start + sink), n)``
(two disjoint ranges, so no key counts twice); a program whose chunk meets neither loads nothing and stores an
empty partial (log2-sum-exp ``-inf``), which the merge kernel of :mod:`.decode_triton` gives zero weight. The grid
is the same whatever the routing (planned for all keys), so the launch reads nothing on the host and a CUDA graph
replays any routing.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .decode_launch import device_index, multiprocessors, tuned_launcher
from .decode_triton import _CHUNK_ALIGN as PLAN_ALIGN
from .decode_triton import plan_wave_splits
from .full_decode_triton import (
    HOPPER_CONFIGS,
    SplitDecodePlan,
    _attend_range,
    _live_keys,
    _pair_operands,
    _pair_tile,
    _store_partial,
)

_LOG2E = 1.4426950408889634
# A local-routed pair's programs finish at once, so the full pairs' work must come in programs small enough, and
# many enough, for the GPU's scheduler to spread over the SMs the local ones leave; but every split adds a
# program's start-up and a partial to merge, which the all-full step pays in full. Measured on an H200 at 32768
# keys, 32/8 heads (bench/results/head_routing_h200/routed_split_sweep.json; us at 0 / 50 / 75% of the pairs
# local, dense 469 us at batch 16):
#   batch 16 (128 pairs):  1 split 469 / 383 / 382,  4: 477 / 279 / 215,  8: 485 / 280 / 176,  16: 499 / 277 / 162,
#                          32: 511 / 279 / 162
#   batch 1 (8 pairs):    16 splits 39.6 / 32.6 / 29.9,  32: 45.4 / 30.3 / 21.1,  64: 50.2 / 31.4 / 22.1
# Past about eight waves of programs the local pairs' share is spread (50% local is as fast at 4 splits as at 32)
# while the all-full step keeps losing; chunks below 1024 keys lose at any share. So: enough splits for
# ROUTED_WAVES waves of programs, but chunks of at least ROUTED_CHUNK keys, and never fewer splits than the wave
# plan. At batch 16 that is 9 splits (+3% all full, where 32 splits cost +9%), at batch 1 still 32.
ROUTED_CHUNK = 1024
ROUTED_WAVES = 8


@functools.lru_cache(maxsize=4096)
def routed_splits(batch: int, kv_heads: int, n_keys: int, sms: int, *, align: int = PLAN_ALIGN) -> int:
    """Key splits per (sequence, KV head) of a routed launch on ``sms`` SMs: enough for ``ROUTED_WAVES`` waves of
    programs (``batch * kv_heads * splits >= ROUTED_WAVES * sms``) but no chunk under ``ROUTED_CHUNK`` keys, and at
    least the wave plan's (:func:`~.decode_triton.plan_wave_splits`, chunks of ``align`` keys). Cached: the wave
    plan's search takes ~1 ms of host time (measured on a slow CPU), and the fused step asks for it twice per call
    (the launcher's rule, then the launch)."""
    wave = plan_wave_splits(batch, kv_heads, n_keys, sms, align=align)[1]
    spread = min(triton.cdiv(ROUTED_WAVES * sms, max(batch * kv_heads, 1)), triton.cdiv(n_keys, ROUTED_CHUNK))
    return max(wave, spread, 1)


@triton.jit(do_not_specialize=["n_keys", "chunk"])
def _routed_decode_split(
    Q, K, V, LOCAL, KV_START, N_VALID, Out, PART_O, PART_LSE,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh,
    n_kv_heads, GROUP, n_keys, chunk, n_splits, sink, window, qk_scale,
    HAS_START: tl.constexpr, HAS_N_VALID: tl.constexpr, SINGLE_SPLIT: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_bk = tl.program_id(0)
    pid_s = tl.program_id(1)
    b, hk, h, row_ok, offs_d, d_ok = _pair_tile(pid_bk, n_kv_heads, GROUP, HEAD_DIM, BLOCK_M, BLOCK_D)
    n_keys, start = _live_keys(n_keys, N_VALID, KV_START, b, HAS_N_VALID, HAS_START)
    lo = tl.maximum(pid_s * chunk, start)
    hi = tl.minimum(pid_s * chunk + chunk, n_keys)
    is_local = tl.load(LOCAL + pid_bk) != 0
    # the ranges this program attends: [lo, hi) for a full head; for a local one its sink part, then its window part
    sink_end = start + sink
    a_hi = tl.where(is_local, tl.minimum(hi, sink_end), hi)
    b_lo = tl.maximum(lo, tl.maximum(n_keys - window, sink_end))
    b_hi = tl.where(is_local, hi, lo)  # empty for a full head: its one range is [lo, a_hi)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if (lo < a_hi) | (b_lo < b_hi):  # a local head's program inside the bulk exits here
        q, k_base, v_base = _pair_operands(Q, K, V, b, hk, h, row_ok, offs_d, d_ok, stride_qb, stride_qh, stride_kb,
                                           stride_kh, stride_vb, stride_vh)
        m_i, l_i, acc = _attend_range(q, k_base, v_base, stride_kn, stride_vn, lo, a_hi, m_i, l_i, acc, offs_d,
                                      d_ok, qk_scale, BLOCK_N, DOT_PRECISION)
        m_i, l_i, acc = _attend_range(q, k_base, v_base, stride_kn, stride_vn, b_lo, b_hi, m_i, l_i, acc, offs_d,
                                      d_ok, qk_scale, BLOCK_N, DOT_PRECISION)

    if SINGLE_SPLIT:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        o_ptrs = Out + b.to(tl.int64) * stride_ob + h[:, None].to(tl.int64) * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        row = b * n_kv_heads * GROUP + h
        _store_partial(PART_O, PART_LSE, row.to(tl.int64) * n_splits + pid_s, m_i, l_i, acc, offs_d, row_ok, d_ok,
                       BLOCK_D)


@functools.cache
def _tuned_launcher(capability: tuple[int, int], block_d: int, block_m: int, autotune: bool,
                    element_bytes: int = 2):
    return tuned_launcher(_routed_decode_split, HOPPER_CONFIGS, capability, block_d, block_m, autotune,
                          element_bytes)


# (capability, BLOCK_D, BLOCK_M, single split, dtype, device length, autotune) -> the tuned config's options
_BEST_CONFIG: dict[tuple, dict] = {}


def routed_decode_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, local: torch.Tensor, *, sink: int,
                         window: int, kv_start: torch.Tensor | None, scale: float, n_valid: torch.Tensor | None = None,
                         splits: int | None = None) -> torch.Tensor:
    """Launch on validated inputs (see :func:`~lighttransfer.kernels.routed_decode`); reads no tensor on the host.
    The grid, partials and config choice are :func:`~.full_decode_triton.full_decode_triton`'s
    (:class:`~.full_decode_triton.SplitDecodePlan`); the split count :func:`routed_splits`'s."""
    if splits is None and q.is_cuda and k.shape[2] > 0:
        splits = routed_splits(q.shape[0], k.shape[1], k.shape[2], multiprocessors(device_index(q)))
    plan = SplitDecodePlan.make(q, k, v, kv_start=kv_start, n_valid=n_valid, splits=splits)
    if plan.n_keys == 0:
        return plan.o.zero_()
    q, k, v, o = plan.q, plan.k, plan.v, plan.o
    flags_local = local.to(device=q.device, dtype=torch.int8).contiguous()
    args = (
        q, k, v, flags_local, plan.start_arg, plan.n_valid_arg, o, plan.part_o, plan.part_lse,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1),
        plan.kv_heads, plan.group, plan.n_keys, plan.chunk, plan.n_splits, sink, window, scale * _LOG2E,
    )
    plan.launch(_routed_decode_split, args, _tuned_launcher, _BEST_CONFIG)
    return o


__all__ = ["routed_decode_triton"]
