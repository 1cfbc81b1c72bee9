"""The fused QAdA decode step (:func:`~lighttransfer.kernels.fused_routed_decode`) in ONE kernel launch and the
merge, as dense :func:`~lighttransfer.kernels.full_decode` runs: the decision is computed redundantly by every
program of a (sequence, KV head) pair instead of once in a pass of its own.

``_decide_attend`` (grid ``(batch * kv_heads, 1 + n_splits)``: column 0 for the local set, columns ``1 ..
n_splits`` for the chunks of the bulk's split plan, the one of the three-launch path's pass 2,
:func:`~.routed_decode_triton.routed_splits`): every program

1. computes its pair's decision, identically: the exact local scores of the ``GROUP`` query heads over the sink +
   window keys (``[kv_start, kv_start + sink)`` and ``[max(n - window, kv_start + sink), n)``, no values) give
   ``lse_L``; the Gaussian bulk mass comes from the moments *as they will be* once the key ``n - 1 - window``
   (weight ``w``, 1 where it is real and past the sinks) joins them, without writing them: ``count + w``, ``qᵀ(Σk +
   w k) = qᵀΣk + w qᵀk`` and ``qᵀ(Σkkᵀ + w kkᵀ)q = qᵀ(Σkkᵀ)q + w (qᵀk)²`` (diagonal: the sums of squares plus
   ``w k²``). One copy of that code, the same inputs: the same bits in every program, so the pair's programs agree
   on the flag without talking to each other;
2. column 0 attends the sink + window keys with their values (slot 0); column ``c > 0`` attends chunk ``c - 1`` of
   the bulk ``[kv_start + sink, n - window)`` where the pair is full, else nothing (an empty partial, log2-sum-exp
   ``-inf``), into slot ``c``. One code path for both (two key ranges, the second empty for a bulk chunk): a
   program holding a second pair of attention loops for the local set (split 0 doing both) needed more registers
   than sm_90 has (255 and 2 KB of spills, compiled with ptxas); this way the attention loops do not spill;
3. takes a ticket from the pair's atomic counter (after a CTA barrier; ``acq_rel`` at GPU scope, so every read of
   the old moments is done before it): the program drawing the last ticket folds the key into the moments in place
   (the pair's ``Σk`` and ``Σkkᵀ``), writes the flag (int8, 1 = local), adds to the routing counts, and sets the
   counter back to zero (a CUDA graph replays the launch); as in the three-launch path, a counter per sequence lets
   the last of its pairs write the shared key count, after every program of the sequence has read the old one.

Then :mod:`.decode_triton`'s merge kernel over the ``1 + n_splits`` slots. No program waits for another.

**Cost, against the three-launch path** (8B shape: D = 128, bf16, sink + window = 1024, 32k keys, 32 splits of 1024
keys; H200, ``bench/results/head_routing_h200/fused_step``). The three-launch path pays a serial pass 1 (its last
program per pair computes the decision after the local attention) and one more launch: fused@0 - routed@0 = 74.7 -
45.9 = 28.8 us at batch 1 and 549.3 - 521.5 = 27.8 us at batch 16, about the same at both batches. The one-launch
path pays instead, per bulk program, the local keys' scores (``1024 · 256 B = 256 KiB`` of K) and the moments (``4
D² = 64 KiB`` full, 512 B diagonal) again, against the 512 KiB of K and V of its bulk chunk, and column 0 reads the
local keys twice: ``pairs · (n_splits · 320 KiB + 256 KiB)`` extra (:func:`extra_bytes`), 82 MiB at batch 1 and
1.3 GiB at batch 16. After a pair's first program these come from L2 when the pair's programs run together (batch
1: 264 programs, two waves of 132 with ~16 programs of each pair in each); at batch 16 a wave holds about one
program of each pair while 66 MB of bulk stream through the 50 MB L2, so they come from memory. At the rate dense
attention reads memory (134 MB in 37.8 us, 3.5 TB/s), 82 MiB cost 25 us (less from L2) and 1.3 GiB 400 us: the
one-launch path wins at batch 1, if narrowly in this pessimistic count, and loses badly at batch 16.
Measured (``bench/results/head_routing_h200/one_launch/``, the 8B shape at 32k, batch 1, CUDA-graph replays): the
byte count was not what limits it. The one-launch step takes 128.7 us at 0% local (126.7 on dense attention's wave
plan) against 75.0 us for the three-launch path and 37.6 us for dense attention, and still 99.5 us at 100% local
(three launches: 35.0 us), where the bulk programs read nothing but the local keys and moments they decide from.
So the cost sits in each program's own decision (the local scores of its ``GROUP`` query heads, then
``qᵀ(Σkkᵀ)q`` in float32 ``ieee`` dots with the spills noted below), repeated by every one of a pair's 33 programs
at one program per SM (136 KB of shared memory), not in the bytes; a profile of the kernel is still to make.
The launcher (``kernels.fused_routing.pick_variant``) therefore takes the three-launch path at every batch; the
one-launch kernel stays selectable (``variant="one-launch"``) and tested, as the base for a cheaper decision.
:func:`extra_bytes` is the byte count above.

Compiled for sm_90 (bf16, D = 128, the pinned 128-key config): 136 KB of shared memory (pass 2's), 255 registers;
the only spills (~256 B a thread) sit in the ``qᵀ(Σkkᵀ)q`` loop of the decision (float32 ``ieee`` dots of 16-row
blocks, kept exact as the reference's; ``tf32x3`` would not spill) and one spill pair in each score loop, none in
the attention loops.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .decode_launch import (
    INTERPRETER_CONFIG,
    capability,
    device_index,
    fallback_config,
    hopper_candidates,
    multiprocessors,
)
from .decode_triton import _streaming_decode_merge, plan_splits
from .full_decode_triton import (
    _CHUNK_ALIGN,
    HOPPER_CONFIGS,
    _attend_range,
    _live_keys,
    _pair_operands,
    _pair_tile,
    _store_partial,
)
from .fused_routing_triton import _decide, _publish
from .routed_decode_triton import routed_splits

_LOG2E = 1.4426950408889634
_LN2_C = tl.constexpr(0.6931471805599453)  # ln 2: log2-sum-exp to natural log



@triton.jit
def _score_range(q, k_base, stride_kn, lo, hi, m_i, l_i, offs_d, d_ok, qk_scale, BLOCK_N: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    # the online log2-sum-exp of the scores over keys [lo, hi) (no values): _attend_range without its output
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        k = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None],
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION)
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(qk * qk_scale - m_new[:, None]), 1)
        m_i = m_new
    return m_i, l_i


@triton.jit(do_not_specialize=["n_keys", "chunk"])
def _decide_attend(
    Q, K, V, KV_START, N_VALID, PART_O, PART_LSE,
    COUNT, FIRST, SECOND, LOCAL, PAIR_TICKET, SEQ_TICKET, STATS,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    n_kv_heads, GROUP, n_keys, chunk, n_splits, n_slots, sink, window, qk_scale, scale, tau,
    HAS_START: tl.constexpr, HAS_N_VALID: tl.constexpr, HAS_STATS: tl.constexpr, DIAGONAL: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_bk = tl.program_id(0)
    pid_c = tl.program_id(1)
    b, hk, h, row_ok, offs_d, d_ok = _pair_tile(pid_bk, n_kv_heads, GROUP, HEAD_DIM, BLOCK_M, BLOCK_D)
    n_keys, start = _live_keys(n_keys, N_VALID, KV_START, b, HAS_N_VALID, HAS_START)
    sink_end = start + sink
    # the local set: the sinks [start, a_hi), the window [w_lo, n) clipped at the sinks' end (nothing counts twice)
    a_hi = tl.minimum(sink_end, n_keys)
    w_lo = tl.maximum(n_keys - window, sink_end)

    q, k_base, v_base = _pair_operands(Q, K, V, b, hk, h, row_ok, offs_d, d_ok, stride_qb, stride_qh, stride_kb,
                                       stride_kh, stride_vb, stride_vh)

    # ---- 1. the decision, the same in every program of the pair
    m_s = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_s = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_s, l_s = _score_range(q, k_base, stride_kn, start, a_hi, m_s, l_s, offs_d, d_ok, qk_scale, BLOCK_N,
                            DOT_PRECISION)
    m_s, l_s = _score_range(q, k_base, stride_kn, w_lo, n_keys, m_s, l_s, offs_d, d_ok, qk_scale, BLOCK_N,
                            DOT_PRECISION)
    seen = l_s > 0.0
    lse = tl.where(seen, m_s + tl.math.log2(tl.where(seen, l_s, 1.0)), float("-inf")) * _LN2_C

    gone = n_keys - 1 - window
    w = tl.where((gone >= 0) & (gone >= sink_end), 1.0, 0.0)
    k_gone = k_base + tl.maximum(gone, 0).to(tl.int64) * stride_kn
    kg = tl.load(k_gone + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    count = tl.load(COUNT + b) + w
    f_ptrs = FIRST + pid_bk.to(tl.int64) * HEAD_DIM + offs_d
    first = tl.load(f_ptrs, mask=d_ok, other=0.0) + kg * w
    qf = q.to(tl.float32)
    n_div = tl.maximum(count, 1.0)
    mean_dot = tl.sum(qf * first[None, :], 1) / n_div
    if DIAGONAL:
        s_ptrs = SECOND + pid_bk.to(tl.int64) * HEAD_DIM + offs_d
        sq = tl.load(s_ptrs, mask=d_ok, other=0.0) + (kg * w) * kg
        mu = first / n_div
        var = tl.sum(qf * qf * sq[None, :], 1) / n_div - tl.sum(qf * qf * (mu * mu)[None, :], 1)
    else:
        # q (Σkkᵀ) q over row blocks [BLOCK_R, D] of the old Σkkᵀ, then the leaving key's w (qᵀk)²
        quad = tl.zeros([BLOCK_M], dtype=tl.float32)
        for r0 in tl.range(0, BLOCK_D, BLOCK_R, num_stages=1):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_ok = offs_r < HEAD_DIM
            s_ptrs = SECOND + (pid_bk.to(tl.int64) * HEAD_DIM + offs_r[:, None]) * HEAD_DIM + offs_d[None, :]
            s_blk = tl.load(s_ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
            t = tl.dot(qf, tl.trans(s_blk), input_precision="ieee")  # [BLOCK_M, BLOCK_R]
            qr = tl.load(Q + b.to(tl.int64) * stride_qb + h[:, None].to(tl.int64) * stride_qh + offs_r[None, :],
                         mask=row_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
            quad += tl.sum(t * qr, 1)
        qk_gone = tl.sum(qf * kg[None, :], 1)
        quad += w * qk_gone * qk_gone
        var = quad / n_div - mean_dot * mean_dot
    local, decided = _decide(lse, mean_dot, var, count, row_ok, n_keys, start, sink, window, scale, tau)

    # ---- 2. column 0: the local set with its values; column c > 0: chunk c - 1 of the bulk where the pair is full
    # (one code path for both: two ranges, the second empty for a bulk chunk); the partial goes to slot c
    lo = tl.maximum((pid_c - 1) * chunk, sink_end)
    hi = tl.minimum(pid_c * chunk, n_keys - window)
    hi = tl.where(local, lo, hi)
    r1_lo = tl.where(pid_c == 0, start, lo)
    r1_hi = tl.where(pid_c == 0, a_hi, hi)
    r2_lo = tl.where(pid_c == 0, w_lo, 0)
    r2_hi = tl.where(pid_c == 0, n_keys, 0)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i, l_i, acc = _attend_range(q, k_base, v_base, stride_kn, stride_vn, r1_lo, r1_hi, m_i, l_i, acc, offs_d,
                                  d_ok, qk_scale, BLOCK_N, DOT_PRECISION)
    m_i, l_i, acc = _attend_range(q, k_base, v_base, stride_kn, stride_vn, r2_lo, r2_hi, m_i, l_i, acc, offs_d,
                                  d_ok, qk_scale, BLOCK_N, DOT_PRECISION)
    row = b * n_kv_heads * GROUP + h
    _store_partial(PART_O, PART_LSE, row.to(tl.int64) * n_slots + pid_c, m_i, l_i, acc, offs_d, row_ok, d_ok,
                   BLOCK_D)

    # ---- 3. the pair's last program folds the key in, writes the flag and counts, resets the counter
    tl.debug_barrier()  # every thread's reads of the old moments done before thread 0's release
    ticket = tl.atomic_add(PAIR_TICKET + pid_bk, 1, sem="acq_rel", scope="gpu")
    if ticket == n_splits:  # 1 + n_splits programs per pair
        # the fold, recomputed from the inputs (nothing of it kept live through the bulk loop)
        kg = tl.load(k_gone + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        tl.store(f_ptrs, tl.load(f_ptrs, mask=d_ok, other=0.0) + kg * w, mask=d_ok)
        if DIAGONAL:
            s_ptrs = SECOND + pid_bk.to(tl.int64) * HEAD_DIM + offs_d
            tl.store(s_ptrs, tl.load(s_ptrs, mask=d_ok, other=0.0) + (kg * w) * kg, mask=d_ok)
        else:
            for u0 in tl.range(0, BLOCK_D, BLOCK_R, num_stages=1):
                offs_u = u0 + tl.arange(0, BLOCK_R)
                u_ok = offs_u < HEAD_DIM
                s_ptrs = SECOND + (pid_bk.to(tl.int64) * HEAD_DIM + offs_u[:, None]) * HEAD_DIM + offs_d[None, :]
                s_mask = u_ok[:, None] & d_ok[None, :]
                kr = tl.load(k_gone + offs_u, mask=u_ok, other=0.0).to(tl.float32)
                s_blk = tl.load(s_ptrs, mask=s_mask, other=0.0) + (kr * w)[:, None] * kg[None, :]
                tl.store(s_ptrs, s_blk, mask=s_mask)
        _publish(LOCAL, STATS, PAIR_TICKET, SEQ_TICKET, COUNT, LOCAL, pid_bk, b, n_kv_heads, local, decided,
                 count, HAS_STATS, False)


def plan_one_launch(batch: int, kv_heads: int, n_keys: int, *, cuda_sms: int | None,
                    splits: int | None = None) -> tuple[int, int]:
    """``(chunk, n_splits)`` of the one-launch kernel: the three-launch path's pass 2 plan (the routed kernel's,
    :func:`~.routed_decode_triton.routed_splits`); ``cuda_sms`` ``None``: the interpreter (one split unless
    given)."""
    if cuda_sms is None:
        return plan_splits(batch, kv_heads, n_keys, 1, align=INTERPRETER_CONFIG.kwargs["BLOCK_N"], splits=splits)
    if splits is None:
        splits = routed_splits(batch, kv_heads, n_keys, cuda_sms, align=_CHUNK_ALIGN)
    return plan_splits(batch, kv_heads, n_keys, 0, align=_CHUNK_ALIGN, splits=splits)


def extra_bytes(batch: int, kv_heads: int, n_splits: int, local_keys: int, dim: int, element_bytes: int, *,
                diagonal: bool) -> int:
    """What the one-launch kernel reads beyond the three-launch path: each of a pair's ``n_splits`` bulk programs
    reads the pair's ``local_keys`` keys (``dim`` elements of ``element_bytes``) and moments (float32 ``dim²`` or
    ``dim``) again, and its local program the keys twice (scores, then attention)."""
    keys = local_keys * dim * element_bytes
    moments = 4 * (dim if diagonal else dim * dim)
    return batch * kv_heads * (n_splits * (keys + moments) + keys)


def one_launch_config(cap: tuple[int, int], block_d: int, block_m: int, element_bytes: int):
    """The pinned config (the kernel has side effects: the autotuner must never replay it): on Hopper the full
    kernel's first candidate that fits, elsewhere the fallback."""
    if cap[0] == 9:
        return hopper_candidates(HOPPER_CONFIGS, block_d, block_m, element_bytes)[0]
    return fallback_config(block_d, block_m, element_bytes)


@functools.cache
def _config_kwargs(cap: tuple[int, int], block_d: int, block_m: int, element_bytes: int) -> dict:
    return one_launch_config(cap, block_d, block_m, element_bytes).all_kwargs()


def fused_one_launch_triton(q, k, v, moments, *, tau: float, sink: int, window: int, kv_start, scale: float,
                            n_valid, counts, workspace, splits=None):
    """Launch ``_decide_attend`` and the merge on validated inputs (see
    :func:`~lighttransfer.kernels.fused_routed_decode`); returns ``(o, flags int8 [batch, kv_heads])``. Reads no
    tensor on the host; the workspace's counters are zero again after the launch."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    batch, heads, _, dim = q.shape
    kv_heads, n_keys = k.shape[1], k.shape[2]
    group = heads // kv_heads
    block_d = max(16, triton.next_power_of_2(dim))
    block_m = max(16, triton.next_power_of_2(group))
    index = device_index(q) if q.is_cuda else None
    chunk, n_splits = plan_one_launch(batch, kv_heads, n_keys, cuda_sms=multiprocessors(index) if q.is_cuda else None,
                                      splits=splits)
    n_slots = 1 + n_splits
    o = torch.empty((batch, heads, 1, dim), dtype=q.dtype, device=q.device)
    part_o = torch.empty((batch, heads, 1, n_slots, block_d), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((batch, heads, 1, n_slots), dtype=torch.float32, device=q.device)
    flags = torch.empty((batch, kv_heads), dtype=torch.int8, device=q.device)
    start = None
    if kv_start is not None:
        start = kv_start.to(q.device)
        start = (start if start.dtype in (torch.int32, torch.int64) else start.long()).contiguous()
    nv = n_valid.to(q.device) if n_valid is not None else None
    args = (q, k, v, start if start is not None else o, nv if nv is not None else o, part_o, part_lse,
            moments.count, moments.first, moments.second, flags, workspace.pair, workspace.sequence,
            counts if counts is not None else part_lse,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            kv_heads, group, n_keys, chunk, n_splits, n_slots, sink, window, scale * _LOG2E, scale, float(tau))
    flags_kw = dict(HAS_START=start is not None, HAS_N_VALID=nv is not None, HAS_STATS=counts is not None,
                    DIAGONAL=moments.diagonal, HEAD_DIM=dim, BLOCK_D=block_d, BLOCK_M=block_m,
                    BLOCK_R=min(16, block_d), DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")

    def run(config: dict) -> None:
        _decide_attend[(batch * kv_heads, n_slots)](*args, **flags_kw, **config)
        _streaming_decode_merge[(batch * heads,)](
            part_o, part_lse, o, heads, 1, n_slots, o.stride(0), o.stride(1), o.stride(2),
            HEAD_DIM=dim, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(n_slots)))

    if not q.is_cuda:
        run(INTERPRETER_CONFIG.kwargs)
        return o, flags
    config = _config_kwargs(capability(index), block_d, block_m, q.element_size())
    if index == torch.cuda.current_device():
        run(config)
    else:
        with torch.cuda.device(index):
            run(config)
    return o, flags


__all__ = ["fused_one_launch_triton", "plan_one_launch", "extra_bytes", "one_launch_config"]
