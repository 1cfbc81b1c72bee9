"""The Triton kernels of :func:`lighttransfer.kernels.topk_rows.topk_rows`: an exact radix select, four rounds of
8-bit digits over an order-preserving 32-bit key, then a gather.

Per row (a float32 vector of ``N`` votes), ``key(v)`` maps the float's bits to an unsigned integer in the order of
the floats (``-inf`` lowest, NaN above ``+inf``, as ``torch.topk`` orders them). Round ``r`` (shift ``24 - 8 r``)
histograms the digit ``(key >> shift) & 255`` of the keys whose higher digits equal the prefix found so far; the
largest digit ``d`` whose count of keys at or above it reaches the ``remaining`` number still to take joins the
prefix, and the keys above it (all certainly in the top-k) leave ``remaining``. After four rounds the prefix is
the exact key of the k-th largest value, ``k - remaining`` keys lie strictly above it and ``remaining`` of the
keys equal to it complete the set. The gather writes both groups (the ties: the first ``remaining`` to claim a
slot), in no particular order.

Launches: one zeroed buffer (the four rounds' histograms), four histogram launches, one gather. Each histogram
program recomputes the digits picked so far from the earlier rounds' histograms (256 counts each), so no launch
is spent on the pick itself. A row flagged in ``SKIP`` (its Selection Cache hit) reads no vote, counts nothing and
writes nothing, so a step where every sequence hits costs the six launches and no work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode_launch import device_index, launch_device, multiprocessors

_BINS = 256
_ROUNDS = 4


@triton.jit
def _order_key(v):
    """int64 in ``[0, 2^32)``: the float32 ``v``'s bits, flipped so that integer order is float order."""
    bits = v.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    return tl.where(bits >= 0x80000000, 0xFFFFFFFF - bits, bits + 0x80000000)


@triton.jit
def _picked(HIST_ROW, k, live, ROUND: tl.constexpr):
    """``(prefix, remaining)`` after the rounds before ``ROUND``, from their histograms (``live`` False: a skipped
    row, nothing read)."""
    bins = tl.arange(0, 256)
    prefix = tl.zeros([], dtype=tl.int64)
    remaining = k + tl.zeros([], dtype=tl.int64)
    for rnd in tl.static_range(ROUND):
        h = tl.load(HIST_ROW + rnd * 256 + bins, mask=bins < 256 * live.to(tl.int32), other=0)
        incl = tl.sum(h, 0) - tl.cumsum(h, 0) + h  # keys (matching the prefix) with this digit or a larger one
        d = tl.sum((incl >= remaining).to(tl.int64), 0) - 1
        remaining -= tl.sum(tl.where(bins == d, incl - h, 0), 0)
        prefix = prefix | (d << (24 - 8 * rnd))
    return prefix, remaining


@triton.jit
def _program_span(SKIP, HIST, n, chunk, HAS_SKIP: tl.constexpr):
    """This program's row ``r``, whether it is live (not skipped), the row's histograms, and its chunk of the votes
    ``[lo, hi)`` (empty for a skipped row: it reads nothing)."""
    r = tl.program_id(0)
    lo = tl.program_id(1) * chunk
    live = tl.zeros([], dtype=tl.int32) == 0
    if HAS_SKIP:
        live = tl.load(SKIP + r) == 0
    hi = tl.where(live, tl.minimum(lo + chunk, n), lo)
    return r, live, HIST + r.to(tl.int64) * (4 * 256), lo, hi


@triton.jit
def _topk_histogram(
    VOTES, SKIP, HIST, stride_v, n, chunk, k,
    ROUND: tl.constexpr, HAS_SKIP: tl.constexpr, BLOCK: tl.constexpr,
):
    r, live, row_hist, lo, hi = _program_span(SKIP, HIST, n, chunk, HAS_SKIP)
    prefix, remaining = _picked(row_hist, k, live, ROUND)
    counts = tl.zeros([512], dtype=tl.int32)
    for start in tl.range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < hi
        v = tl.load(VOTES + r.to(tl.int64) * stride_v + offs, mask=m, other=0.0)
        key = _order_key(v)
        if ROUND > 0:
            m = m & ((key >> (32 - 8 * ROUND)) == (prefix >> (32 - 8 * ROUND)))
        digit = (key >> (24 - 8 * ROUND)) & 255
        counts += tl.histogram(tl.where(m, digit, 256).to(tl.int32), 512)  # bin 256: not counted
    bins = tl.arange(0, 512)
    # (a bound that folds in the row's flag: a vector mask, which the interpreter needs)
    tl.atomic_add(row_hist + ROUND * 256 + bins, counts.to(tl.int64), mask=bins < 256 * live.to(tl.int32))


@triton.jit
def _topk_gather(
    VOTES, SKIP, HIST, COUNTS, VAL, IDX, stride_v, n, chunk, k,
    HAS_SKIP: tl.constexpr, BLOCK: tl.constexpr,
):
    r, live, row_hist, lo, hi = _program_span(SKIP, HIST, n, chunk, HAS_SKIP)
    kth, remaining = _picked(row_hist, k, live, 4)
    above = k - remaining  # keys strictly above the k-th: all taken, slots [0, above)
    out = r.to(tl.int64) * k
    for start in tl.range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < hi
        v = tl.load(VOTES + r.to(tl.int64) * stride_v + offs, mask=m, other=0.0)
        key = _order_key(v)
        gt = m & (key > kth)
        eq = m & (key == kth)
        n_gt = tl.sum(gt.to(tl.int32), 0)
        base = tl.atomic_add(COUNTS + r * 2, n_gt.to(tl.int64))
        slot = base + tl.cumsum(gt.to(tl.int64), 0) - 1
        tl.store(VAL + out + slot, v, mask=gt)
        tl.store(IDX + out + slot, offs.to(tl.int64), mask=gt)
        n_eq = tl.sum(eq.to(tl.int32), 0)
        base_eq = tl.atomic_add(COUNTS + r * 2 + 1, n_eq.to(tl.int64))
        slot_eq = base_eq + tl.cumsum(eq.to(tl.int64), 0) - 1
        keep = eq & (slot_eq < remaining)
        tl.store(VAL + out + above + slot_eq, v, mask=keep)
        tl.store(IDX + out + above + slot_eq, offs.to(tl.int64), mask=keep)


def topk_rows_triton(votes: torch.Tensor, k: int, skip: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the select on validated inputs (float32 ``[R, N]`` with unit stride, ``1 <= k <= N``, ``skip``
    int8 ``[R]`` or ``None``); returns ``(values [R, k] float32, indices [R, k] int64)``, unwritten for skipped
    rows."""
    rows, n = votes.shape
    values = torch.empty((rows, k), dtype=torch.float32, device=votes.device)
    indices = torch.empty((rows, k), dtype=torch.long, device=votes.device)
    if rows == 0:
        return values, indices
    # the four histograms of every row, then the gather's two claim counters, in one zeroed buffer (one launch)
    scratch = torch.zeros(rows * (_ROUNDS * _BINS + 2), dtype=torch.long, device=votes.device)
    hist, counts = scratch[: rows * _ROUNDS * _BINS], scratch[rows * _ROUNDS * _BINS:]
    if votes.is_cuda:
        block = 1024
        wanted = 4 * multiprocessors(device_index(votes))
    else:
        block, wanted = 64, 4
    blocks = triton.cdiv(n, block)
    per_row = max(1, min(blocks, triton.cdiv(wanted, rows)))
    chunk = triton.cdiv(blocks, per_row) * block
    grid = (rows, triton.cdiv(n, chunk))
    skip_arg = skip if skip is not None else counts
    with launch_device(votes):
        for rnd in range(_ROUNDS):
            _topk_histogram[grid](votes, skip_arg, hist, votes.stride(0), n, chunk, k, ROUND=rnd,
                                  HAS_SKIP=skip is not None, BLOCK=block)
        _topk_gather[grid](votes, skip_arg, hist, counts, values, indices, votes.stride(0), n, chunk, k,
                           HAS_SKIP=skip is not None, BLOCK=block)
    return values, indices



__all__ = ["topk_rows_triton"]
