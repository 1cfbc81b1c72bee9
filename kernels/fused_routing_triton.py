"""Triton kernels of the fused QAdA decode step (:func:`~lighttransfer.kernels.fused_routed_decode`): the decision
and the attention of one full layer in two passes and a merge, nothing read on the host.

Pass 1, ``_local_decide`` (grid ``(batch * kv_heads, n_local)``): one program takes one (sequence, KV head) and one
chunk of its local set, the ``sink + window`` keys listed sink first (virtual index ``x < sink``: key ``kv_start +
x``; else key ``n - window - sink + x``, clipped so that nothing counts twice), for all ``GROUP`` query heads, and
stores a float32 partial (output, log2-sum-exp) in slot ``chunk`` of the merge layout. Every pair needs this work,
full or local. With the full covariance each program also folds the key that left the window into its share of
the pair's ``Σkkᵀ`` rows (blocks of :data:`FOLD_ROWS`, round robin) and stores its part of every query head's
``qᵀ(Σkkᵀ)q``. Then the pair's programs take a ticket from a per-pair atomic counter; the one that draws the last
ticket (the "last block" pattern: no program ever waits for another) folds the key into the first moment (and
the diagonal one), merges the pair's local log2-sum-exps into ``lse_L`` and the parts into ``qᵀΣq``, computes
each query head's Gaussian bulk mass and ``f̂``, writes the pair's routing flag (int8, 1 = local), adds to the
routing counts and sets the counter back to zero for the next launch (a CUDA graph replays it). The moments' key count is one value per sequence
shared by its KV heads: a second counter per sequence lets the last of its pairs write it, after every pair read
the old one.

Why the last program sees every partial: each program stores its partial, then (a CTA barrier, then the counter's
``acq_rel`` atomic at GPU scope) releases it; the program that draws the last ticket has acquired every earlier
release, and reads the log2-sum-exps with ``volatile`` loads (past the SM's L1, which is not coherent).

Pass 2, ``_bulk_attend`` (grid ``(batch * kv_heads, n_bulk)``, its own launch, so it reads the flags pass 1
wrote): chunks of the key axis clipped to the bulk ``[kv_start + sink, n - window)``; a local pair's programs store
an empty partial (log2-sum-exp ``-inf``, zeros) and exit. Then :mod:`.decode_triton`'s merge kernel over all
``n_local + n_bulk`` slots.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from .decode_launch import (
    INTERPRETER_CONFIG,
    autotune_enabled,
    capability,
    decode_config,
    device_index,
    fallback_config,
    hopper_candidates,
    multiprocessors,
    tuned_launcher,
)
from .decode_triton import _streaming_decode_merge, plan_splits, plan_wave_splits

# pass 2's chunks of the key axis are multiples of every candidate BLOCK_N: the full kernel's alignment (its configs)
from .full_decode_triton import (
    _CHUNK_ALIGN,
    HOPPER_CONFIGS,
    _attend_pair_keys,
    _attend_range,
    _live_keys,
    _pair_operands,
    _pair_tile,
    _store_partial,
)
from .routed_decode_triton import routed_splits

_LOG2E = 1.4426950408889634
_LN2_C = tl.constexpr(0.6931471805599453)  # ln 2: log2-sum-exp to natural log
# pass 1 works on ~1k keys per pair: 64-key tiles (the local chunks are cut at multiples of it)
LOCAL_CONFIGS = [decode_config(64, 4, 3), decode_config(64, 4, 2)]
_LOCAL_ALIGN = 64
# rows of Σkkᵀ per block of the full covariance's fold: D = 128 makes four blocks, each pass-1 program folding
# every n_local-th one (at least four programs where the local set allows, so no program folds more than one)
FOLD_ROWS = 32


@triton.jit
def _decide(lse, mean_dot, var, count, row_ok, n_keys, start, sink, window, scale, tau):
    """The pair's routing from its query heads' local log-sum-exps ``lse`` (natural log) and the Gaussian bulk's
    ``q·μ`` and ``qᵀΣq − (q·μ)²`` (``mean_dot``, ``var``, over ``count`` keys): ``(local, decided)``, local where
    every head's predicted far share ``f̂ = m̂_B / (m_L + m̂_B)`` is at most ``tau`` or there is no bulk; decided
    where there is one (what the routing counts count). The rule of :mod:`~lighttransfer.kernels.head_routing`."""
    has = count > 0.0
    mean_dot = tl.where(has, mean_dot, 0.0)
    var = tl.where(has, tl.maximum(var, 0.0), 0.0)
    n_bulk = tl.maximum(n_keys - window - start - sink, 0).to(tl.float32)
    decided = n_bulk > 0.0
    log_n = tl.where(decided, tl.log(tl.maximum(n_bulk, 1.0)), float("-inf"))
    log_bulk = log_n + scale * mean_dot + 0.5 * scale * scale * var
    lse = tl.where(row_ok, lse, 0.0)  # padding rows of the tile (no key): a finite stand-in, masked below
    far = 1.0 / (1.0 + tl.exp(lse - log_bulk))  # sigmoid(log m̂_B - lse_L), as torch computes it
    far = tl.where(row_ok & (far == far), far, 0.0)
    local = (tl.max(far, 0) <= tau) | (n_bulk <= 0.0)
    return local, decided


@triton.jit
def _publish(LOCAL, STATS, PAIR_TICKET, SEQ_TICKET, COUNT, STATE, pid_bk, b, n_kv_heads, local, decided, count,
             HAS_STATS: tl.constexpr, HAS_STATE: tl.constexpr):
    """The pair's last program, after folding the key in: the routing flag, the counts, the pair's counter back to
    zero (a CUDA graph replays the launch), and the sequence's last pair writes the key count, after every pair
    of the sequence has read the old one. ``HAS_STATE``: the pair's state word (int32, 1 = local, 2 = full) is
    set too, atomically, for programs of the same launch that poll it."""
    tl.store(LOCAL + pid_bk, local.to(tl.int8))
    if HAS_STATE:
        tl.atomic_xchg(STATE + pid_bk, tl.where(local, 1, 2), sem="release", scope="gpu")
    if HAS_STATS:
        tl.atomic_add(STATS, (local & decided).to(tl.float64))
        tl.atomic_add(STATS + 1, decided.to(tl.float64))
    tl.store(PAIR_TICKET + pid_bk, 0)
    tl.debug_barrier()
    last = tl.atomic_add(SEQ_TICKET + b, 1, sem="acq_rel", scope="gpu")
    if last == n_kv_heads - 1:
        tl.store(COUNT + b, count)
        tl.store(SEQ_TICKET + b, 0)


@triton.jit
def _fold_share(Q, SECOND, q, k_gone, w, b, h, row_ok, offs_d, d_ok, stride_qb, stride_qh, pid_bk, pid_c, n_local,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """Program ``pid_c``'s share of the pair's ``Σkkᵀ`` (float32 ``[HEAD_DIM, HEAD_DIM]``): the row blocks
    ``[r0, r0 + BLOCK_R)`` for ``r0 = (pid_c + i * n_local) * BLOCK_R``, each updated with the leaving key ``w·kkᵀ``
    and written back; returns its part of every query head's ``qᵀ(Σkkᵀ)q`` ``[BLOCK_M]``. Spread this way the
    fold costs the pair's last program nothing: with it alone doing all 128 rows it was the step's longest
    serial part (H200, 8B shape: ~25 us of the step at batch 1 and 16 against the diagonal's)."""
    qf = q.to(tl.float32)
    kg = tl.load(k_gone + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    quad = tl.zeros([BLOCK_M], dtype=tl.float32)
    for r0 in tl.range(pid_c * BLOCK_R, BLOCK_D, n_local * BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < HEAD_DIM
        s_ptrs = SECOND + (pid_bk.to(tl.int64) * HEAD_DIM + offs_r[:, None]) * HEAD_DIM + offs_d[None, :]
        s_mask = r_ok[:, None] & d_ok[None, :]
        kr = tl.load(k_gone + offs_r, mask=r_ok, other=0.0).to(tl.float32)
        s_blk = tl.load(s_ptrs, mask=s_mask, other=0.0) + (kr * w)[:, None] * kg[None, :]
        tl.store(s_ptrs, s_blk, mask=s_mask)
        t = tl.dot(qf, tl.trans(s_blk), input_precision="ieee")  # [BLOCK_M, BLOCK_R]
        qr = tl.load(Q + b.to(tl.int64) * stride_qb + h[:, None].to(tl.int64) * stride_qh + offs_r[None, :],
                     mask=row_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        quad += tl.sum(t * qr, 1)
    return quad


@triton.jit
def _local_chunk_decide(
    Q, K, V, KV_START, N_VALID, PART_O, PART_LSE,
    COUNT, FIRST, SECOND, LOCAL, PAIR_TICKET, SEQ_TICKET, STATS, STATE, QUAD,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    pid_bk, pid_c, n_kv_heads, GROUP, n_keys, local_chunk, n_local, n_slots, sink, window, qk_scale, scale, tau,
    HAS_START: tl.constexpr, HAS_N_VALID: tl.constexpr, HAS_STATS: tl.constexpr, HAS_STATE: tl.constexpr,
    DIAGONAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program ``(pid_bk, pid_c)`` of pass 1: chunk ``pid_c`` of pair ``pid_bk``'s local set into slot ``pid_c``;
    with the full covariance also its share of the ``Σkkᵀ`` fold (:func:`_fold_share`); and, in the pair's last
    program, the decision (:func:`_publish`; ``HAS_STATE``: also the pair's state word for the overlapped
    kernel's bulk programs, :mod:`.fused_routing_overlap_triton`)."""
    b, hk, h, row_ok, offs_d, d_ok = _pair_tile(pid_bk, n_kv_heads, GROUP, HEAD_DIM, BLOCK_M, BLOCK_D)
    n_keys, start = _live_keys(n_keys, N_VALID, KV_START, b, HAS_N_VALID, HAS_START)
    sink_end = start + sink
    # this chunk of the local set, in virtual indices [v_lo, v_hi): the sinks first, then the window
    v_lo = pid_c * local_chunk
    v_hi = tl.minimum(v_lo + local_chunk, sink + window)
    a_lo = start + v_lo
    a_hi = tl.minimum(start + tl.minimum(v_hi, sink), n_keys)
    base = n_keys - window - sink  # window key = base + virtual index
    b_lo = tl.maximum(base + tl.maximum(v_lo, sink), sink_end)
    b_hi = base + v_hi

    q, k_base, v_base = _pair_operands(Q, K, V, b, hk, h, row_ok, offs_d, d_ok, stride_qb, stride_qh, stride_kb,
                                       stride_kh, stride_vb, stride_vh)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i, l_i, acc = _attend_range(q, k_base, v_base, stride_kn, stride_vn, a_lo, a_hi, m_i, l_i, acc, offs_d,
                                  d_ok, qk_scale, BLOCK_N, DOT_PRECISION)
    m_i, l_i, acc = _attend_range(q, k_base, v_base, stride_kn, stride_vn, b_lo, b_hi, m_i, l_i, acc, offs_d,
                                  d_ok, qk_scale, BLOCK_N, DOT_PRECISION)
    row = b * n_kv_heads * GROUP + h
    _store_partial(PART_O, PART_LSE, row.to(tl.int64) * n_slots + pid_c, m_i, l_i, acc, offs_d, row_ok, d_ok, BLOCK_D)

    # the key that leaves the window at this step joins the bulk's moments (where real and past the sinks)
    gone = n_keys - 1 - window
    w = tl.where((gone >= 0) & (gone >= sink_end), 1.0, 0.0)
    k_gone = k_base + tl.maximum(gone, 0).to(tl.int64) * stride_kn
    offs_m = tl.arange(0, BLOCK_M)
    if not DIAGONAL:
        quad_part = _fold_share(Q, SECOND, q, k_gone, w, b, h, row_ok, offs_d, d_ok, stride_qb, stride_qh, pid_bk,
                               pid_c, n_local, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_R)
        tl.store(QUAD + (pid_bk.to(tl.int64) * n_local + pid_c) * BLOCK_M + offs_m, quad_part)

    # every thread's stores before thread 0's release: the barrier, then the acq_rel atomic at GPU scope
    tl.debug_barrier()
    ticket = tl.atomic_add(PAIR_TICKET + pid_bk, 1, sem="acq_rel", scope="gpu")
    if ticket == n_local - 1:
        # the pair's last program: lse_L from every chunk's partial (natural log)
        offs_c = tl.arange(0, BLOCK_C)
        parts = tl.load(PART_LSE + row.to(tl.int64)[:, None] * n_slots + offs_c[None, :],
                        mask=row_ok[:, None] & (offs_c < n_local)[None, :], other=float("-inf"), volatile=True)
        top = tl.max(parts, 1)
        top = tl.where(top == float("-inf"), 0.0, top)
        total = tl.sum(tl.math.exp2(parts - top[:, None]), 1)
        lse = tl.where(total > 0.0, top + tl.math.log2(tl.where(total > 0.0, total, 1.0)), float("-inf")) * _LN2_C

        kg = tl.load(k_gone + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        count = tl.load(COUNT + b, volatile=True) + w
        f_ptrs = FIRST + pid_bk.to(tl.int64) * HEAD_DIM + offs_d
        first = tl.load(f_ptrs, mask=d_ok, other=0.0) + kg * w
        tl.store(f_ptrs, first, mask=d_ok)
        qf = q.to(tl.float32)
        n_div = tl.maximum(count, 1.0)
        mean_dot = tl.sum(qf * first[None, :], 1) / n_div
        if DIAGONAL:
            s_ptrs = SECOND + pid_bk.to(tl.int64) * HEAD_DIM + offs_d
            sq = tl.load(s_ptrs, mask=d_ok, other=0.0) + (kg * w) * kg
            tl.store(s_ptrs, sq, mask=d_ok)
            mu = first / n_div
            var = tl.sum(qf * qf * sq[None, :], 1) / n_div - tl.sum(qf * qf * (mu * mu)[None, :], 1)
        else:
            # q (Σkkᵀ) q: the partial sums of the pair's programs (each folded its rows of Σkkᵀ before its ticket)
            quads = tl.load(QUAD + (pid_bk.to(tl.int64) * n_local + offs_c[:, None]) * BLOCK_M + offs_m[None, :],
                            mask=(offs_c < n_local)[:, None], other=0.0, volatile=True)
            quad = tl.sum(quads, 0)
            var = quad / n_div - mean_dot * mean_dot
        local, decided = _decide(lse, mean_dot, var, count, row_ok, n_keys, start, sink, window, scale, tau)
        _publish(LOCAL, STATS, PAIR_TICKET, SEQ_TICKET, COUNT, STATE, pid_bk, b, n_kv_heads, local, decided, count,
                 HAS_STATS, HAS_STATE)


@triton.jit(do_not_specialize=["n_keys", "local_chunk"])
def _local_decide(
    Q, K, V, KV_START, N_VALID, PART_O, PART_LSE,
    COUNT, FIRST, SECOND, LOCAL, PAIR_TICKET, SEQ_TICKET, STATS, QUAD,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    n_kv_heads, GROUP, n_keys, local_chunk, n_local, n_slots, sink, window, qk_scale, scale, tau,
    HAS_START: tl.constexpr, HAS_N_VALID: tl.constexpr, HAS_STATS: tl.constexpr, DIAGONAL: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    _local_chunk_decide(Q, K, V, KV_START, N_VALID, PART_O, PART_LSE, COUNT, FIRST, SECOND, LOCAL, PAIR_TICKET,
                        SEQ_TICKET, STATS, LOCAL, QUAD, stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb,
                        stride_vh, stride_vn, tl.program_id(0), tl.program_id(1), n_kv_heads, GROUP, n_keys,
                        local_chunk, n_local, n_slots, sink, window, qk_scale, scale, tau, HAS_START, HAS_N_VALID,
                        HAS_STATS, False, DIAGONAL, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, BLOCK_C, BLOCK_R,
                        DOT_PRECISION)


@triton.jit(do_not_specialize=["n_keys", "chunk"])
def _bulk_attend(
    Q, K, V, LOCAL, KV_START, N_VALID, PART_O, PART_LSE,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    n_kv_heads, GROUP, n_keys, chunk, n_local, n_slots, sink, window, qk_scale,
    HAS_START: tl.constexpr, HAS_N_VALID: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_bk = tl.program_id(0)
    pid_s = tl.program_id(1)
    b, hk, h, row_ok, offs_d, d_ok = _pair_tile(pid_bk, n_kv_heads, GROUP, HEAD_DIM, BLOCK_M, BLOCK_D)
    n_keys, start = _live_keys(n_keys, N_VALID, KV_START, b, HAS_N_VALID, HAS_START)
    lo = tl.maximum(pid_s * chunk, start + sink)
    hi = tl.minimum(pid_s * chunk + chunk, n_keys - window)
    hi = tl.where(tl.load(LOCAL + pid_bk) != 0, lo, hi)  # a local pair's programs attend nothing
    m_i, l_i, acc = _attend_pair_keys(Q, K, V, b, hk, h, row_ok, offs_d, d_ok, stride_qb, stride_qh, stride_kb,
                                      stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, lo, hi, qk_scale,
                                      BLOCK_M, BLOCK_D, BLOCK_N, DOT_PRECISION)
    row = b * n_kv_heads * GROUP + h
    _store_partial(PART_O, PART_LSE, row.to(tl.int64) * n_slots + n_local + pid_s, m_i, l_i, acc, offs_d, row_ok,
                   d_ok, BLOCK_D)


@dataclasses.dataclass
class FusedWorkspace:
    """The fused step's counters, int32, zero between launches (each launch sets back what it counted): one
    ticket per (sequence, KV head) ``[batch * kv_heads]``, one per sequence ``[batch]``, and the overlapped
    kernel's state word per (sequence, KV head) ``[batch * kv_heads]`` (0 undecided, 1 local, 2 full; its merge
    sets it back). Keep one per layer and make it outside a CUDA-graph capture (a captured step reuses it on every
    replay)."""

    pair: torch.Tensor
    sequence: torch.Tensor
    state: torch.Tensor

    @classmethod
    def zeros(cls, batch: int, kv_heads: int, device) -> FusedWorkspace:
        return cls(torch.zeros(batch * kv_heads, dtype=torch.int32, device=device),
                   torch.zeros(batch, dtype=torch.int32, device=device),
                   torch.zeros(batch * kv_heads, dtype=torch.int32, device=device))

    def fits(self, batch: int, kv_heads: int, device) -> bool:
        return self.pair.numel() == batch * kv_heads and self.sequence.numel() == batch \
            and self.state.numel() == batch * kv_heads and self.pair.device == torch.device(device)


@functools.cache
def _bulk_launcher(cap: tuple[int, int], block_d: int, block_m: int, autotune: bool, element_bytes: int):
    # pass 2 has no side effect but its partials, so the autotuner may replay it; pass 1 must never be replayed
    return tuned_launcher(_bulk_attend, HOPPER_CONFIGS, cap, block_d, block_m, autotune, element_bytes,
                          key=("HEAD_DIM", "BLOCK_M"))


def _local_config(cap: tuple[int, int], block_d: int, block_m: int, element_bytes: int):
    if cap[0] == 9:
        return hopper_candidates(LOCAL_CONFIGS, block_d, block_m, element_bytes)[0]
    return fallback_config(block_d, block_m, element_bytes)


def fold_rows(block_d: int) -> int:
    """Rows of ``Σkkᵀ`` per fold block (:data:`FOLD_ROWS`, at most ``BLOCK_D``)."""
    return min(FOLD_ROWS, block_d)


def fold_buffer(pairs: int, n_local: int, block_m: int, diagonal: bool, device) -> torch.Tensor:
    """float32 ``[pairs * n_local * block_m]``: each pass-1 program's part of its query heads' ``qᵀ(Σkkᵀ)q``,
    which the pair's last program sums (one element, never read, for the diagonal covariance)."""
    return torch.empty(1 if diagonal else pairs * n_local * block_m, dtype=torch.float32, device=device)


# (capability, BLOCK_D, BLOCK_M, dtype, device length, autotune) -> pass 2's tuned config
_BEST_BULK: dict[tuple, dict] = {}


def plan_fused(batch: int, kv_heads: int, n_keys: int, local_keys: int, *, cuda_sms: int | None,
               splits: int | None = None, local_splits: int | None = None,
               fold_splits: int = 1) -> tuple[int, int, int, int]:
    """``(local_chunk, n_local, chunk, n_bulk)``: pass 1 cuts the ``local_keys = sink + window`` local set into the
    fewest chunks that fill the GPU's waves (:func:`~.decode_triton.plan_wave_splits`), but at least
    ``fold_splits`` where the local set allows (the programs that share the full covariance's fold); pass 2 cuts the key axis as
    the routed kernel does (:func:`~.routed_decode_triton.routed_splits`: enough for a few waves of programs, so
    the full pairs' work spreads over the SMs the local pairs leave). ``cuda_sms`` ``None``: the interpreter (one split each,
    unless given)."""
    if cuda_sms is None:
        align = INTERPRETER_CONFIG.kwargs["BLOCK_N"]
        local_chunk, n_local = plan_splits(batch, kv_heads, local_keys, 1, align=align, splits=local_splits)
        chunk, n_bulk = plan_splits(batch, kv_heads, n_keys, 1, align=align, splits=splits)
        return local_chunk, n_local, chunk, n_bulk
    local_chunk, n_local = plan_wave_splits(batch, kv_heads, local_keys, cuda_sms, align=_LOCAL_ALIGN,
                                            splits=local_splits)
    if local_splits is None and n_local < fold_splits:
        local_chunk, n_local = plan_splits(batch, kv_heads, local_keys, 0, align=_LOCAL_ALIGN, splits=fold_splits)
    if splits is None:
        splits = routed_splits(batch, kv_heads, n_keys, cuda_sms, align=_CHUNK_ALIGN)
    chunk, n_bulk = plan_splits(batch, kv_heads, n_keys, 0, align=_CHUNK_ALIGN, splits=splits)
    return local_chunk, n_local, chunk, n_bulk


def fused_routed_decode_triton(q, k, v, moments, *, tau: float, sink: int, window: int, kv_start, scale: float,
                               n_valid, counts, workspace: FusedWorkspace, splits=None, local_splits=None,
                               balanced: bool = False, min_units: int | None = None):
    """Launch pass 1, pass 2 and the merge on validated inputs (see
    :func:`~lighttransfer.kernels.fused_routed_decode`); returns ``(o, flags int8 [batch, kv_heads])``.

    ``balanced``: pass 2 and the merge of :mod:`.fused_routing_balanced_triton` (the full pairs' bulk spread over a
    fixed number of programs: :data:`~.fused_routing_balanced_triton.PROGRAMS_PER_SM` per SM, or ``splits`` where
    given), pieces of at least ``min_units`` units of
    keys (default: :data:`~.fused_routing_balanced_triton.MIN_PIECE_KEYS` keys on a GPU,
    :data:`~.fused_routing_balanced_triton.INTERPRETER_MIN_UNITS` in the interpreter). More pairs than
    :data:`~.fused_routing_balanced_triton.MAX_PAIRS`: the three-launch pass 2."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    batch, heads, _, dim = q.shape
    kv_heads, n_keys = k.shape[1], k.shape[2]
    group = heads // kv_heads
    block_d = max(16, triton.next_power_of_2(dim))
    block_m = max(16, triton.next_power_of_2(group))
    index = None
    if q.is_cuda:
        index = device_index(q)
    block_r = fold_rows(block_d)
    if balanced:
        from . import fused_routing_balanced_triton as bal

        balanced = batch * kv_heads <= bal.MAX_PAIRS
    local_chunk, n_local, chunk, n_bulk = plan_fused(batch, kv_heads, n_keys, sink + window,
                                                     cuda_sms=multiprocessors(index) if q.is_cuda else None,
                                                     splits=splits, local_splits=local_splits,
                                                     fold_splits=1 if moments.diagonal else block_d // block_r)
    if balanced:
        cap = capability(index) if q.is_cuda else None
        # pinned (pass 1's config: 64-key tiles where they fit), so the unit of work is known before the launch
        bulk_config = INTERPRETER_CONFIG.kwargs if cap is None else \
            _local_config(cap, block_d, block_m, q.element_size()).all_kwargs()
        unit = bulk_config["BLOCK_N"]
        if min_units is None:
            min_units = bal.INTERPRETER_MIN_UNITS if cap is None else max(1, bal.MIN_PIECE_KEYS // unit)
        programs = splits if splits is not None else \
            (bal.PROGRAMS_PER_SM * multiprocessors(index) if q.is_cuda else 3)
        n_bulk = bal.bulk_slots(n_keys, window, unit, min_units)
    n_slots = n_local + n_bulk
    quad = fold_buffer(batch * kv_heads, n_local, block_m, moments.diagonal, q.device)
    o = torch.empty((batch, heads, 1, dim), dtype=q.dtype, device=q.device)
    part_o = torch.empty((batch, heads, 1, n_slots, block_d), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((batch, heads, 1, n_slots), dtype=torch.float32, device=q.device)
    flags = torch.empty((batch, kv_heads), dtype=torch.int8, device=q.device)
    start = None
    if kv_start is not None:
        start = kv_start.to(q.device)
        start = (start if start.dtype in (torch.int32, torch.int64) else start.long()).contiguous()
    nv = n_valid.to(q.device) if n_valid is not None else None
    common = dict(HAS_START=start is not None, HAS_N_VALID=nv is not None, HEAD_DIM=dim, BLOCK_D=block_d,
                  BLOCK_M=block_m, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    start_arg = start if start is not None else o  # placeholder pointers, never read
    nv_arg = nv if nv is not None else o
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
               v.stride(2))
    local_args = (q, k, v, start_arg, nv_arg, part_o, part_lse, moments.count, moments.first, moments.second, flags,
                  workspace.pair, workspace.sequence, counts if counts is not None else part_lse, quad, *strides,
                  kv_heads, group, n_keys, local_chunk, n_local, n_slots, sink, window, scale * _LOG2E, scale,
                  float(tau))
    local_flags = dict(common, HAS_STATS=counts is not None, DIAGONAL=moments.diagonal,
                       BLOCK_C=max(2, triton.next_power_of_2(n_local)), BLOCK_R=block_r)
    bulk_args = (q, k, v, flags, start_arg, nv_arg, part_o, part_lse, *strides, kv_heads, group, n_keys, chunk,
                 n_local, n_slots, sink, window, scale * _LOG2E)

    def merge():
        _streaming_decode_merge[(batch * heads,)](
            part_o, part_lse, o, heads, 1, n_slots, o.stride(0), o.stride(1), o.stride(2),
            HEAD_DIM=dim, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(n_slots)))

    def balanced_rest():
        bal.launch_balanced(q, k, v, flags, start_arg, nv_arg, part_o, part_lse, o, strides, kv_heads=kv_heads,
                            group=group, n_keys=n_keys, n_local=n_local, n_slots=n_slots, sink=sink, window=window,
                            qk_scale=scale * _LOG2E, unit=unit, min_units=min_units, programs=programs,
                            common=common, config=bulk_config)

    if not q.is_cuda:
        _local_decide[(batch * kv_heads, n_local)](*local_args, **local_flags, **INTERPRETER_CONFIG.kwargs)
        if balanced:
            balanced_rest()
            return o, flags
        _bulk_attend[(batch * kv_heads, n_bulk)](*bulk_args, **common, **INTERPRETER_CONFIG.kwargs)
        merge()
        return o, flags
    cap = capability(index)
    key = (cap, block_d, block_m, q.dtype, nv is not None, autotune_enabled())
    best = _BEST_BULK.get(key)
    bulk = _bulk_attend if best is not None else _bulk_launcher(cap, block_d, block_m, key[-1], q.element_size())

    def run() -> None:
        _local_decide[(batch * kv_heads, n_local)](
            *local_args, **local_flags, **_local_config(cap, block_d, block_m, q.element_size()).all_kwargs())
        if balanced:
            balanced_rest()
            return
        bulk[(batch * kv_heads, n_bulk)](*bulk_args, **common, **(best or {}))
        merge()

    if index == torch.cuda.current_device():
        run()
    else:
        with torch.cuda.device(index):
            run()
    if best is None:
        config = getattr(bulk, "best_config", None)
        if config is not None and hasattr(config, "all_kwargs"):
            _BEST_BULK[key] = config.all_kwargs()
    return o, flags


__all__ = ["fused_routed_decode_triton", "FusedWorkspace", "plan_fused", "fold_buffer", "fold_rows", "LOCAL_CONFIGS",
           "FOLD_ROWS"]
