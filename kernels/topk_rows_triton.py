"""The Triton kernels of :func:`lighttransfer.kernels.topk_rows.topk_rows`: an exact radix select, four rounds of
8-bit digits over an order-preserving 32-bit key, then a gather.

Per row (a float32 vector of ``N`` votes), ``key(v)`` maps the float's bits to an unsigned integer in the order of
the floats (``-inf`` lowest, NaN above ``+inf``, as ``torch.topk`` orders them). Round ``r`` (shift ``24 - 8 r``)
histograms the digit ``(key >> shift) & 255`` of the keys whose higher digits equal the prefix found so far; the
largest digit ``d`` whose count of keys at or above it reaches the ``remaining`` number still to take joins the
prefix, and the keys above it (all certainly in the top-k) leave ``remaining``. After four rounds the prefix is
the exact key of the k-th largest value, ``k - remaining`` keys lie strictly above it and ``remaining`` of the
keys equal to it complete the set. The gather writes both groups: first the keys above, then the first
``remaining`` ties, each group in ascending index order, so the result is the same on every run (a tie at the
k-th value goes to the lower index) and so is the attention summed over the list that is built from it.

Launches: one zeroed buffer (the four rounds' histograms), four histogram launches, a count of each chunk's keys
above and at the k-th value (plain stores, one pair per program), and the gather, whose program writes from the
slot its row's earlier chunks end at (their counts summed: no atomics, so no order decided by the scheduler).
Each program recomputes the digits picked so far from the earlier rounds' histograms (256 counts each), so no
launch is spent on the pick itself. A row flagged in ``SKIP`` (its Selection Cache hit) reads no vote, counts
nothing and writes nothing, so a step where every sequence hits costs the seven launches and no work.
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
def _chunk_keys(VOTES, r, stride_v, start, hi, kth, BLOCK: tl.constexpr):
    """One block of the row's chunk: offsets, values, and the masks of the keys above and at the k-th."""
    offs = start + tl.arange(0, BLOCK)
    m = offs < hi
    v = tl.load(VOTES + r.to(tl.int64) * stride_v + offs, mask=m, other=0.0)
    key = _order_key(v)
    return offs, v, m & (key > kth), m & (key == kth)


@triton.jit
def _topk_chunk_counts(
    VOTES, SKIP, HIST, CHUNK_COUNTS, stride_v, n, chunk, k, n_chunks,
    HAS_SKIP: tl.constexpr, BLOCK: tl.constexpr,
):
    """``CHUNK_COUNTS[r, c] = (keys above the k-th, keys equal to it)`` in chunk ``c`` of row ``r``."""
    r, live, row_hist, lo, hi = _program_span(SKIP, HIST, n, chunk, HAS_SKIP)
    kth, _ties_left = _picked(row_hist, k, live, 4)
    n_gt = tl.zeros([], dtype=tl.int64)
    n_eq = tl.zeros([], dtype=tl.int64)
    for start in tl.range(lo, hi, BLOCK):
        _offs, _vals, gt, eq = _chunk_keys(VOTES, r, stride_v, start, hi, kth, BLOCK)
        n_gt += tl.sum(gt.to(tl.int64), 0)
        n_eq += tl.sum(eq.to(tl.int64), 0)
    at = CHUNK_COUNTS + (r.to(tl.int64) * n_chunks + tl.program_id(1)) * 2
    tl.store(at, n_gt)
    tl.store(at + 1, n_eq)


@triton.jit
def _topk_gather(
    VOTES, SKIP, HIST, CHUNK_COUNTS, VAL, IDX, stride_v, n, chunk, k, n_chunks,
    HAS_SKIP: tl.constexpr, BLOCK: tl.constexpr, CHUNKS: tl.constexpr,
):
    r, live, row_hist, lo, hi = _program_span(SKIP, HIST, n, chunk, HAS_SKIP)
    kth, remaining = _picked(row_hist, k, live, 4)
    above = k - remaining  # keys strictly above the k-th: all taken, slots [0, above)
    out = r.to(tl.int64) * k
    # where this chunk's keys go: after those of the row's earlier chunks (skipped rows: nothing read)
    c = tl.arange(0, CHUNKS)
    earlier = c < tl.program_id(1) * live.to(tl.int32)  # (the row's flag folded into the bound, as above)
    row_counts = CHUNK_COUNTS + (r.to(tl.int64) * n_chunks + c) * 2
    base = tl.sum(tl.load(row_counts, mask=earlier, other=0), 0)
    base_eq = tl.sum(tl.load(row_counts + 1, mask=earlier, other=0), 0)
    for start in tl.range(lo, hi, BLOCK):
        offs, v, gt, eq = _chunk_keys(VOTES, r, stride_v, start, hi, kth, BLOCK)
        slot = base + tl.cumsum(gt.to(tl.int64), 0) - 1
        tl.store(VAL + out + slot, v, mask=gt)
        tl.store(IDX + out + slot, offs.to(tl.int64), mask=gt)
        base += tl.sum(gt.to(tl.int64), 0)
        slot_eq = base_eq + tl.cumsum(eq.to(tl.int64), 0) - 1
        keep = eq & (slot_eq < remaining)
        tl.store(VAL + out + above + slot_eq, v, mask=keep)
        tl.store(IDX + out + above + slot_eq, offs.to(tl.int64), mask=keep)
        base_eq += tl.sum(eq.to(tl.int64), 0)


def topk_rows_triton(votes: torch.Tensor, k: int, skip: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the select on validated inputs (float32 ``[R, N]`` with unit stride, ``1 <= k <= N``, ``skip``
    int8 ``[R]`` or ``None``); returns ``(values [R, k] float32, indices [R, k] int64)``, unwritten for skipped
    rows."""
    rows, n = votes.shape
    values = torch.empty((rows, k), dtype=torch.float32, device=votes.device)
    indices = torch.empty((rows, k), dtype=torch.long, device=votes.device)
    if rows == 0:
        return values, indices
    hist = torch.zeros(rows * _ROUNDS * _BINS, dtype=torch.long, device=votes.device)  # the rounds' histograms
    if votes.is_cuda:
        block = 1024
        wanted = 4 * multiprocessors(device_index(votes))
    else:
        block, wanted = 64, 4
    blocks = triton.cdiv(n, block)
    per_row = max(1, min(blocks, triton.cdiv(wanted, rows)))
    chunk = triton.cdiv(blocks, per_row) * block
    chunks = triton.cdiv(n, chunk)
    grid = (rows, chunks)
    chunk_counts = torch.empty((rows, chunks, 2), dtype=torch.long, device=votes.device)  # every entry written
    skip_arg = skip if skip is not None else hist
    has_skip = skip is not None
    with launch_device(votes):
        for rnd in range(_ROUNDS):
            _topk_histogram[grid](votes, skip_arg, hist, votes.stride(0), n, chunk, k, ROUND=rnd,
                                  HAS_SKIP=has_skip, BLOCK=block)
        _topk_chunk_counts[grid](votes, skip_arg, hist, chunk_counts, votes.stride(0), n, chunk, k, chunks,
                                 HAS_SKIP=has_skip, BLOCK=block)
        _topk_gather[grid](votes, skip_arg, hist, chunk_counts, values, indices, votes.stride(0), n, chunk, k,
                           chunks, HAS_SKIP=has_skip, BLOCK=block, CHUNKS=triton.next_power_of_2(chunks))
    return values, indices



__all__ = ["topk_rows_triton"]
