"""The balanced bulk pass of the fused QAdA step (``variant="balanced"`` of
:func:`~lighttransfer.kernels.fused_routed_decode`): pass 2 and the merge of :mod:`.fused_routing_triton`, with the
full pairs' bulk spread evenly over a fixed number of programs whatever the routed share.

Why: pass 2 of the three-launch step has a grid of ``pairs x splits`` chunks fixed before the decision. With every
pair full, few splits are fastest (each split costs a program's start-up and a partial to merge); with most pairs
local, many are (the full pairs' chunks must be small enough to spread over the SMs the local ones leave, and
the last wave's tail shrinks with them). No fixed count is best at both ends
(``bench/results/head_routing_h200/routed_split_sweep.json``).

The work, as the decision leaves it: the full pairs, ranked in order (``r = 0 .. F - 1``, an exclusive prefix sum
of their flags), each with the same ``T = ceil((n - window) / unit)`` units of ``unit`` keys over ``[0, n -
window)`` (the keys before ``kv_start + sink`` are clipped away per sequence; all pairs of a step see the same
``n``). Unit ``u`` of the concatenation ``[0, F T)`` is unit ``u mod T`` of the full pair ranked ``u div T``. With
``P`` programs, each takes ``W = max(ceil(F T / P), min_units)`` consecutive units: program ``p`` covers ``[p W,
(p + 1) W)``, cut where it crosses from one pair to the next, and stores one partial per piece. The pieces of the
pair ranked ``r`` are those of programs ``first(r) = r T div W`` to ``last(r) = ((r + 1) T - 1) div W``; program
``p`` stores its piece of that pair in the pair's bulk slot ``p - first(r)``, so a pair uses at most ``ceil(T / W)
+ 1 <= ceil(T / min_units) + 1`` bulk slots (``n_bulk``, fixed by the storage length at plan time).

The merge knows the same numbers: it recomputes ``F``, ``W`` and the pair's rank from the flags and merges the
pair's local slots and its ``last - first + 1`` bulk slots (none for a local pair), so no slot is cleared first and
no local pair launches a program. Every program reads all the flags (``pairs`` int8 values) to rank them; both
kernels hold them in one block (``BLOCK_P``, so up to :data:`MAX_PAIRS` pairs).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .decode_triton import _merge_partials
from .full_decode_triton import _attend_pair_keys, _live_keys, _store_partial

# pairs (batch x KV heads) one block of flags holds; more than that and the launcher keeps the three-launch pass 2
MAX_PAIRS = 4096
# keys per piece at least on a GPU (as the routed kernel's chunks: smaller ones lose at any share)
MIN_PIECE_KEYS = 1024
# programs per SM on a GPU (the bench's --balanced-per-sm): one, as dense decoding's single wave at batch 16
PROGRAMS_PER_SM = 1
# units per piece at least in the interpreter: one, so that small test shapes cut their pairs finely
INTERPRETER_MIN_UNITS = 1


@triton.jit
def _full_ranks(LOCAL, n_pairs, BLOCK_P: tl.constexpr):
    # every pair's index [BLOCK_P], whether it is full, its rank among the full pairs before it, and their count
    offs = tl.arange(0, BLOCK_P)
    full = (tl.load(LOCAL + offs, mask=offs < n_pairs, other=1) == 0).to(tl.int32)
    return offs, full, tl.cumsum(full, 0) - full, tl.sum(full, 0)


@triton.jit
def _piece_width(n_full, units, n_programs, min_units):
    # W: units per program (at least min_units; never 0)
    return tl.maximum(tl.cdiv(n_full * units, n_programs), tl.maximum(min_units, 1))


# the key count changes every step; the plan's small integers may be 1, which Triton would otherwise specialize
# into a constant (a second compilation, and a constant where the pieces' arithmetic expects a value)
@triton.jit(do_not_specialize=["n_keys", "n_local", "min_units", "n_programs"])
def _bulk_balanced(
    Q, K, V, LOCAL, KV_START, N_VALID, PART_O, PART_LSE,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    n_pairs, n_kv_heads, GROUP, n_keys, n_local, n_slots, sink, window, qk_scale, unit, min_units, n_programs,
    HAS_START: tl.constexpr, HAS_N_VALID: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    p = tl.program_id(0)
    pairs, full, rank, n_full = _full_ranks(LOCAL, n_pairs, BLOCK_P)
    n_keys, _ = _live_keys(n_keys, N_VALID, KV_START, 0, HAS_N_VALID, False)
    bulk_end = n_keys - window  # every sequence's bulk ends here; it starts at its kv_start + sink
    units = tl.cdiv(tl.maximum(bulk_end, 0), unit)
    width = _piece_width(n_full, units, n_programs, min_units)
    u = p * width
    u_end = tl.minimum(u + width, n_full * units)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < GROUP
    d_ok = offs_d < HEAD_DIM
    while u < u_end:  # one piece per full pair this program's units cross
        r = u // units
        t0 = u - r * units
        t1 = tl.minimum(units, t0 + (u_end - u))
        pair = tl.sum(tl.where((full != 0) & (rank == r), pairs, 0), 0)  # the full pair ranked r
        b = pair // n_kv_heads
        hk = pair % n_kv_heads
        h = hk * GROUP + offs_m
        _, start = _live_keys(n_keys, N_VALID, KV_START, b, False, HAS_START)
        lo = tl.maximum(t0 * unit, start + sink)
        hi = tl.minimum(t1 * unit, bulk_end)
        m_i, l_i, acc = _attend_pair_keys(Q, K, V, b, hk, h, row_ok, offs_d, d_ok, stride_qb, stride_qh, stride_kb,
                                          stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, lo, hi, qk_scale,
                                          BLOCK_M, BLOCK_D, BLOCK_N, DOT_PRECISION)
        slot = n_local + p - (r * units) // width
        row = b * n_kv_heads * GROUP + h
        _store_partial(PART_O, PART_LSE, row.to(tl.int64) * n_slots + slot, m_i, l_i, acc, offs_d, row_ok, d_ok,
                       BLOCK_D)
        u += t1 - t0


@triton.jit(do_not_specialize=["n_keys", "n_local", "min_units", "n_programs"])
def _merge_balanced(
    PART_O, PART_LSE, LOCAL, N_VALID, Out,
    n_pairs, H, n_kv_heads, n_keys, n_local, n_slots, window, unit, min_units, n_programs,
    stride_ob, stride_oh,
    HAS_N_VALID: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    row = tl.program_id(0)  # flat (b, h)
    b = row // H
    h = row % H
    pair = b * n_kv_heads + h // (H // n_kv_heads)
    pairs, full, rank, n_full = _full_ranks(LOCAL, n_pairs, BLOCK_P)
    n_keys, _ = _live_keys(n_keys, N_VALID, N_VALID, 0, HAS_N_VALID, False)  # no padding read: one pointer
    units = tl.cdiv(tl.maximum(n_keys - window, 0), unit)
    width = _piece_width(n_full, units, n_programs, min_units)
    mine = pairs == pair
    is_full = tl.sum(tl.where(mine, full, 0), 0) != 0
    r = tl.sum(tl.where(mine, rank, 0), 0)
    used = ((r + 1) * units - 1) // width - (r * units) // width + 1
    n_used = n_local + tl.where(is_full & (units > 0), used, 0)
    out = _merge_partials(PART_O, PART_LSE, row, n_slots, n_used, BLOCK_D, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(Out + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def bulk_slots(n_keys: int, window: int, unit: int, min_units: int) -> int:
    """Bulk slots per pair for a storage of ``n_keys`` keys: ``ceil(T / min_units) + 1`` with ``T = ceil((n_keys -
    window) / unit)`` (at least 1)."""
    units = triton.cdiv(max(n_keys - window, 0), unit)
    return triton.cdiv(units, max(min_units, 1)) + 1


def launch_balanced(q, k, v, flags, start_arg, nv_arg, part_o, part_lse, o, strides, *, kv_heads: int, group: int,
                    n_keys: int, n_local: int, n_slots: int, sink: int, window: int, qk_scale: float, unit: int,
                    min_units: int, programs: int, common: dict, config: dict) -> None:
    """Pass 2 (``programs`` programs) and the merge of the balanced variant, after pass 1 wrote ``flags``."""
    batch, heads = q.shape[0], q.shape[1]
    pairs = batch * kv_heads
    block_p = max(2, triton.next_power_of_2(pairs))
    _bulk_balanced[(programs,)](
        q, k, v, flags, start_arg, nv_arg, part_o, part_lse, *strides, pairs, kv_heads, group, n_keys, n_local,
        n_slots, sink, window, qk_scale, unit, min_units, programs, **common, BLOCK_P=block_p, **config)
    _merge_balanced[(batch * heads,)](
        part_o, part_lse, flags, nv_arg, o, pairs, heads, kv_heads, n_keys, n_local, n_slots, window, unit,
        min_units, programs, o.stride(0), o.stride(1), HAS_N_VALID=common["HAS_N_VALID"],
        HEAD_DIM=common["HEAD_DIM"], BLOCK_D=common["BLOCK_D"], BLOCK_S=max(2, triton.next_power_of_2(n_slots)),
        BLOCK_P=block_p)


__all__ = ["launch_balanced", "bulk_slots", "MAX_PAIRS", "MIN_PIECE_KEYS", "INTERPRETER_MIN_UNITS",
           "PROGRAMS_PER_SM"]
