"""Triton kernels of TokenSelect's fresh selection with one read of the keys: the soft vote summed over all heads,
and the index list built straight from the top-k (:mod:`.token_select`).

**One-pass vote.** The paper's vote ``S(t) = sum_h softmax_t(c_h)(t)`` needs each head's log-sum-exp over all
candidates before any head's probability can be summed over the heads, and the sum cannot be rescaled afterwards
(each head has its own normaliser). So pass 1 (one program per (sequence, KV head, key chunk), all ``GROUP`` query
heads of the KV head as the rows of one tile, each K tile read once) writes every head's scores ``[rows, heads, N]``
float32 (in log2 units: ``c * log2(e)``) and each chunk's per-head log2-sum-exp; pass 2 (one program per
(sequence, key block)) merges the chunks' log2-sum-exps per head, reads the scores back and writes
``S(t) = sum_h 2^(score_h(t) - lse2_h)``: ``[rows, N]`` float32, ``-inf`` outside the candidates. Exact: the same
float32 scores as the two-pass kernel, kept instead of recomputed.

Bytes per key (8B shape: 8 KV heads x 128 x bf16 = 2 KiB of K, 32 query heads): pass 1 reads 2048 and writes 128
(the scores), pass 2 reads 128 and writes 4: 2308 B against the two-pass kernel's 4096 + 32 (K twice, per-KV-head
votes), 1.78x fewer, and no launch to sum the KV heads' votes. The price is ``rows * heads * N * 4`` bytes of
scratch (268 MB at 16 x 128k x 32 heads; 16.8 MB per sequence).

**Index list.** The list a fresh selection attends to is ``[init keys | top-k | recent keys]`` in that order,
``init + k + local`` int32 slots, ``-1`` for unused ones (init keys past the query, top-k slots of a query with fewer
candidates, recent keys below ``kv_start + init``). :func:`~lighttransfer.kernels.select_attention` does not need
the keys in order (the online softmax is order-free; every slot is a masked gather), so nothing is sorted: one
launch writes the list and the Selection Cache's ``picked`` from ``torch.topk``'s values and indices.

**Selection Cache on the device.** Both vote passes take a per-sequence ``skip`` flag (a hit): its programs read no
key and its votes are ``-inf``, the grid unchanged (no host-side list of the rows to score). The list kernel takes
the hit flags, the cached top-k and the anchors' key indices: a hit keeps its cached picks (each slot read and
written back by the same program, so the top-k may be updated in place) and the recent keys ``(anchor - local,
query]``, in ``extra`` more slots than a fresh list (the caller's bound on a reused selection's age).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode_launch import (
    INTERPRETER_CONFIG,
    OTHER_SHARED_MEMORY,
    SHARED_MEMORY_MARGIN,
    device_index,
    int8_flags,
    launch_device,
    multiprocessors,
)
from .decode_triton import plan_splits

_LOG2E = 1.4426950408889634
_SCORE_ALIGN = 256
# pass 2: keys per program, and the pinned launch of pass 1 on a GPU (64-key tiles, as the contiguous decode)
_SUM_BLOCK = 128
_SCORE_BLOCK_N = 64


@triton.jit(do_not_specialize=["n_keys", "chunk", "init", "local"])
def _token_scores(
    Q, K, KV_START, ROWS, SKIP, N_VALID, SCORES, PART_LSE,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kn,
    n_kv_heads, GROUP, n_keys, chunk, n_splits, init, local, qk_scale,
    HAS_START: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_SKIP: tl.constexpr, HAS_VALID: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_bk = tl.program_id(0)
    pid_s = tl.program_id(1)
    r = pid_bk // n_kv_heads  # output row; it scores sequence ROWS[r] when only some sequences are asked
    if HAS_ROWS:
        b = tl.load(ROWS + r).to(tl.int32)
    else:
        b = r
    hk = pid_bk % n_kv_heads
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < GROUP
    d_ok = offs_d < HEAD_DIM
    h = hk * GROUP + offs_m
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h[:, None].to(tl.int64) * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    row = r * n_kv_heads * GROUP + h  # [BLOCK_M] flat (output row, head)
    s_base = SCORES + row.to(tl.int64) * n_keys

    cand_lo = init
    if HAS_START:
        cand_lo += tl.load(KV_START + b).to(tl.int32)
    live = n_keys
    if HAS_VALID:  # a static step: the storage holds n_keys slots, of which the first N_VALID are keys
        live = tl.load(N_VALID).to(tl.int32)
    lo = tl.maximum(pid_s * chunk, cand_lo)
    hi = tl.minimum(pid_s * chunk + chunk, live - local)
    if HAS_SKIP:  # a skipped sequence (its Selection Cache hit): no key read, no score written
        hi = tl.where(tl.load(SKIP + b) != 0, lo, hi)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        k = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None],
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        # the scores of candidates only: pass 2 reads no other
        tl.store(s_base[:, None] + offs_n[None, :], qk, mask=row_ok[:, None] & n_ok[None, :])
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(qk - m_new[:, None]), 1)
        m_i = m_new

    seen = l_i > 0.0
    lse2 = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    tl.store(PART_LSE + row.to(tl.int64) * n_splits + pid_s, lse2, mask=row_ok)


@triton.jit(do_not_specialize=["n_keys", "chunk", "init", "local"])
def _token_votes_total(
    SCORES, PART_LSE, KV_START, ROWS, SKIP, N_VALID, VOTES,
    heads, n_keys, chunk, n_splits, init, local,
    HAS_START: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_SKIP: tl.constexpr, HAS_VALID: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr,
):
    r = tl.program_id(0)
    pid_t = tl.program_id(1)
    if HAS_ROWS:
        b = tl.load(ROWS + r).to(tl.int32)
    else:
        b = r
    offs_h = tl.arange(0, BLOCK_H)
    offs_s = tl.arange(0, BLOCK_S)
    h_ok = offs_h < heads
    # each head's log2-sum-exp over all candidates, from its chunks' (a few hundred bytes per sequence)
    row = r * heads + offs_h
    part = tl.load(PART_LSE + row[:, None].to(tl.int64) * n_splits + offs_s[None, :],
                   mask=h_ok[:, None] & (offs_s[None, :] < n_splits), other=float("-inf"))
    top = tl.max(part, 1)
    top = tl.where(top > float("-inf"), top, 0.0)
    total = tl.sum(tl.math.exp2(part - top[:, None]), 1)
    lse2 = tl.where(total > 0.0, top + tl.math.log2(tl.where(total > 0.0, total, 1.0)), float("-inf"))

    cand_lo = init
    if HAS_START:
        cand_lo += tl.load(KV_START + b).to(tl.int32)
    cand_hi = n_keys - local
    if HAS_VALID:
        cand_hi = tl.load(N_VALID).to(tl.int32) - local
    if HAS_SKIP:  # a skipped sequence has no candidate: its votes are -inf, no score read
        cand_hi = tl.where(tl.load(SKIP + b) != 0, 0, cand_hi)
    # a head with no candidate (lse2 = -inf) has none of its scores read: 2^(-inf - 0) = 0, never a NaN
    lse2 = tl.where(lse2 > float("-inf"), lse2, 0.0)
    s_base = SCORES + row[:, None].to(tl.int64) * n_keys
    hi = tl.minimum(pid_t * chunk + chunk, n_keys)
    for start_t in tl.range(pid_t * chunk, hi, BLOCK_T):
        offs_t = start_t + tl.arange(0, BLOCK_T)
        cand = (offs_t >= cand_lo) & (offs_t < cand_hi)
        s = tl.load(s_base + offs_t[None, :], mask=h_ok[:, None] & cand[None, :], other=float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        p = tl.where(h_ok[:, None] & cand[None, :], p, 0.0)
        vote = tl.where(cand, tl.sum(p, 0), float("-inf"))
        tl.store(VOTES + r.to(tl.int64) * n_keys + offs_t, vote, mask=offs_t < hi)


@triton.jit(do_not_specialize=["n_keys", "k_found", "init", "local"])
def _build_list(
    TOP_VAL, TOP_IDX, KV_START, HIT, CACHED, ANCHOR_POS, N_VALID, IDX, PICKED,
    stride_tv, stride_ti, n_keys, k_found, init, local, extra,
    K_SELECT: tl.constexpr, HAS_START: tl.constexpr, REUSE: tl.constexpr, HAS_VALID: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0)
    pid = tl.program_id(1)
    start = 0
    if HAS_START:
        start = tl.load(KV_START + r).to(tl.int32)
    p = n_keys - 1  # the query's key index (a static step: the last of the N_VALID live keys)
    if HAS_VALID:
        p = tl.load(N_VALID).to(tl.int32) - 1
    width = init + K_SELECT + local + extra
    made = p  # the key index of the query the selection was made with (a reused one: its anchor's)
    if REUSE:
        hit = tl.load(HIT + r) != 0
        made = tl.where(hit, tl.load(ANCHOR_POS + r).to(tl.int32), p)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    # slots [0, init): the first real keys up to the query
    first = start + offs
    key = tl.where((offs < init) & (first <= p), first, -1)
    # slots [init, init + k): the top-k where the vote is finite (a query with fewer candidates leaves -1)
    j = offs - init
    in_top = (j >= 0) & (j < K_SELECT)
    found = in_top & (j < k_found)
    val = tl.load(TOP_VAL + r.to(tl.int64) * stride_tv + j, mask=found, other=float("-inf"))
    top = tl.load(TOP_IDX + r.to(tl.int64) * stride_ti + j, mask=found, other=-1).to(tl.int32)
    top = tl.where(val > float("-inf"), top, -1)
    if REUSE:  # a hit keeps its cached top-k (read and written back by the same program when in place)
        hits = (tl.zeros([BLOCK], dtype=tl.int32) + hit.to(tl.int32)) != 0  # the flag as a block (a load mask)
        cached = tl.load(CACHED + r.to(tl.int64) * K_SELECT + j, mask=in_top & hits, other=-1).to(tl.int32)
        top = tl.where(hit, cached, top)
    key = tl.where(in_top, top, key)
    tl.store(PICKED + r.to(tl.int64) * K_SELECT + j, top.to(tl.int64), mask=in_top)
    # slots [init + k, width): the recent keys (made - local, p] not below kv_start + init (a fresh selection's
    # are the last ``local``; a reused one keeps its anchor's window extended to the query, ``extra`` slots more
    # at most)
    near = made - local + 1 + (offs - init - K_SELECT)
    recent = (offs >= init + K_SELECT) & (near >= start + init) & (near <= p)
    key = tl.where(offs >= init + K_SELECT, tl.where(recent, near, -1), key)
    tl.store(IDX + r.to(tl.int64) * width + offs, key, mask=offs < width)


def _score_tiles(block_d: int, element_bytes: int) -> tuple[int, dict]:
    """Pass 1's pinned launch on a GPU: 64-key tiles in 3 stages, fewer stages or keys where the K tiles would
    not fit the shared memory every GPU since Ampere offers (fp32 at head size 256)."""
    budget = OTHER_SHARED_MEMORY - SHARED_MEMORY_MARGIN
    block_n, stages = _SCORE_BLOCK_N, 3
    while block_n > 16 and stages * block_n * block_d * element_bytes > budget:
        if stages > 2:
            stages -= 1
        else:
            block_n //= 2
    return block_n, dict(num_warps=4, num_stages=stages)


def total_votes_triton(q: torch.Tensor, k: torch.Tensor, *, init: int, local: int, kv_start: torch.Tensor | None,
                       scale: float, splits: int | None = None, rows: torch.Tensor | None = None,
                       skip: torch.Tensor | None = None, n_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the two passes on validated inputs (see :func:`~lighttransfer.kernels.token_select.total_votes`);
    returns ``[batch, N]`` float32, or ``[len(rows), N]`` for the sequences ``rows``; the sequences flagged in
    ``skip [batch]`` (bool) read no key and get ``-inf`` votes. ``n_valid`` (int ``[1]`` on the device): only the
    first ``n_valid`` of the ``N`` keys exist (the grid and scratch stay planned for ``N``)."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    _, heads, _, dim = q.shape
    kv_heads, n_keys = k.shape[1], k.shape[2]
    group = heads // kv_heads
    if rows is not None:
        rows = rows.to(device=q.device, dtype=torch.int32).contiguous()
    batch = q.shape[0] if rows is None else rows.numel()
    votes = torch.empty((batch, n_keys), dtype=torch.float32, device=q.device)
    if batch == 0 or n_keys == 0:
        return votes
    block_d = max(16, triton.next_power_of_2(dim))
    block_m = max(16, triton.next_power_of_2(group))
    if q.is_cuda:
        wanted = 4 * multiprocessors(device_index(q))
        chunk, n_splits = plan_splits(batch, kv_heads, n_keys, wanted, align=_SCORE_ALIGN, splits=splits)
        block_n, launch = _score_tiles(block_d, q.element_size())
    else:
        chunk, n_splits = plan_splits(batch, kv_heads, n_keys, 1, align=INTERPRETER_CONFIG.kwargs["BLOCK_N"],
                                      splits=splits)
        block_n, launch = INTERPRETER_CONFIG.kwargs["BLOCK_N"], {}
    start = None if kv_start is None else kv_start.to(device=q.device, dtype=torch.int32).contiguous()
    scores = torch.empty((batch, heads, n_keys), dtype=torch.float32, device=q.device)
    part = torch.empty((batch, heads, n_splits), dtype=torch.float32, device=q.device)
    start_arg = start if start is not None else part
    rows_arg = rows if rows is not None else part
    skip_arg = part if skip is None else int8_flags(skip, q.device)
    valid_arg = part if n_valid is None else n_valid.to(device=q.device, dtype=torch.int32).contiguous()
    flags = dict(HAS_START=start is not None, HAS_ROWS=rows is not None, HAS_SKIP=skip is not None,
                 HAS_VALID=n_valid is not None)
    with launch_device(q):
        _token_scores[(batch * kv_heads, n_splits)](
            q, k, start_arg, rows_arg, skip_arg, valid_arg, scores, part, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            k.stride(2), kv_heads, group, n_keys, chunk, n_splits, int(init), int(local), scale * _LOG2E, **flags,
            HEAD_DIM=dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **launch)
        # pass 2: about as many programs as pass 1, each merging the chunks' log2-sum-exps once for its keys
        block_t = _SUM_BLOCK if q.is_cuda else 16
        chunk2 = triton.cdiv(triton.cdiv(n_keys, kv_heads * n_splits), block_t) * block_t
        _token_votes_total[(batch, triton.cdiv(n_keys, chunk2))](
            scores, part, start_arg, rows_arg, skip_arg, valid_arg, votes, heads, n_keys, chunk2, n_splits, int(init), int(local),
            **flags,
            BLOCK_H=max(2, triton.next_power_of_2(heads)), BLOCK_S=max(2, triton.next_power_of_2(n_splits)),
            BLOCK_T=block_t)
    return votes


def build_list_triton(values: torch.Tensor, picked: torch.Tensor, *, n_keys: int, k_select: int, init: int,
                      local: int, kv_start: torch.Tensor | None, hit: torch.Tensor | None = None,
                      cached: torch.Tensor | None = None, anchor_pos: torch.Tensor | None = None, extra: int = 0,
                      out: torch.Tensor | None = None,
                      n_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch from ``torch.topk``'s ``values, picked [R, k']`` (``k' <= k_select``) to the list ``[R, 1,
    init + k_select + local + extra]`` int32 and the top-k ``[R, k_select]`` int64 (``-1`` where no finite vote).

    With ``hit [R]`` (bool): those rows keep ``cached [R, k_select]`` int64 and the recent keys from their
    ``anchor_pos [R]`` on (at most ``extra`` more than ``local``: the caller's bound). ``out``: the top-k's
    ``[R, k_select]`` int64 storage (may be ``cached`` itself: each slot is read and written by one program).
    ``n_valid`` (int ``[1]`` on the device): the query is key ``n_valid - 1`` instead of ``n_keys - 1``."""
    rows = values.shape[0]
    width = int(init) + int(k_select) + int(local) + int(extra)
    idx = torch.empty((rows, 1, width), dtype=torch.int32, device=values.device)
    top = torch.empty((rows, int(k_select)), dtype=torch.long, device=values.device) if out is None else out
    if rows == 0 or width == 0:
        return top, idx
    start = None if kv_start is None else kv_start.to(device=values.device, dtype=torch.int32).contiguous()
    reuse = hit is not None
    if reuse:
        hit = int8_flags(hit, values.device)
        anchor_pos = anchor_pos.to(device=values.device).contiguous()
        cached = cached.contiguous()
    valid = None if n_valid is None else n_valid.to(device=values.device, dtype=torch.int32).contiguous()
    block = 1024 if values.is_cuda else 64
    with launch_device(values):
        _build_list[(rows, triton.cdiv(width, block))](
            values, picked, start if start is not None else values, hit if reuse else values,
            cached if reuse else picked, anchor_pos if reuse else picked, valid if valid is not None else values,
            idx, top, values.stride(0), picked.stride(0), int(n_keys), int(values.shape[1]), int(init), int(local),
            int(extra), K_SELECT=int(k_select), HAS_START=start is not None, REUSE=reuse,
            HAS_VALID=valid is not None, BLOCK=block)
    return top, idx



def bytes_read_onepass(*, batch: int, heads: int, kv_heads: int, head_dim: int, dtype_bytes: int,
                       n_keys: int, init: int = 0, local: int = 0) -> int:
    """The one-pass vote's floor in bytes: the candidate keys once, the float32 scores written and read back, and
    the votes written."""
    cand = max(0, n_keys - init - local)
    return batch * (cand * (kv_heads * head_dim * dtype_bytes + 2 * 4 * heads) + 4 * n_keys)


__all__ = ["total_votes_triton", "build_list_triton", "bytes_read_onepass"]
