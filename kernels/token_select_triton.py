"""Triton kernels of TokenSelect's decode step (:mod:`.token_select`): the soft vote and the attention over an
index list.

Votes (one query per sequence): two passes over the candidate keys, each one program per (sequence, KV head, key
chunk) with all ``GROUP`` query heads of that KV head as the rows of one tile, so each K tile is read once per KV
head (GQA, never repeated). Pass 1 writes each head's log2-sum-exp of its chunk; the chunks merge into one per head
(``[batch, heads]``, a few bytes); pass 2 recomputes the scores and writes, per KV head and key, the sum over its
query heads of ``2^(c * log2(e) - lse2_h)`` (the head's softmax): ``[batch, kv_heads, N]``, ``-inf`` outside the
candidates. Bytes read: twice the candidate keys (no values).

Attention over an index list (any number of queries per sequence, each with its own list): one program per
(sequence, query, KV head, chunk of the list) gathers the listed K/V rows (each row one contiguous ``head_dim``
vector), runs the online softmax of flash-decoding for the ``GROUP`` query heads, and the chunks' partials merge
by log2-sum-exp in the merge kernel of :mod:`.decode_triton`. Bytes read: the listed K/V rows and the indices.
"""

from __future__ import annotations

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
    multiprocessors,
    tuned_launcher,
)
from .decode_triton import _streaming_decode_merge, plan_splits
from .full_decode_triton import HOPPER_CONFIGS as CONTIGUOUS_CONFIGS

_LOG2E = 1.4426950408889634
# chunking of the key axis (votes: contiguous tiles up to 256 wide) and of the index list (gathers: up to 64)
_VOTE_ALIGN = 256
_GATHER_ALIGN = 64
_VOTE_KEY = ("HEAD_DIM", "BLOCK_M", "HAS_START", "HAS_ROWS")


@triton.jit(do_not_specialize=["n_keys", "chunk", "init", "local"])
def _token_votes_stats(
    Q, K, KV_START, ROWS, PART_LSE,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kn,
    n_kv_heads, GROUP, n_keys, chunk, n_splits, init, local, qk_scale,
    HAS_START: tl.constexpr, HAS_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_bk = tl.program_id(0)
    pid_s = tl.program_id(1)
    r = pid_bk // n_kv_heads  # output row; the sequence it scores is ROWS[r] when only some sequences are asked
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

    # this chunk's share of the candidates [kv_start + init, n_keys - local)
    cand_lo = init
    if HAS_START:
        cand_lo += tl.load(KV_START + b).to(tl.int32)
    lo = tl.maximum(pid_s * chunk, cand_lo)
    hi = tl.minimum(pid_s * chunk + chunk, n_keys - local)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        k = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None],
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(qk - m_new[:, None]), 1)
        m_i = m_new

    seen = l_i > 0.0
    lse2 = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    row = r * n_kv_heads * GROUP + h
    tl.store(PART_LSE + row.to(tl.int64) * n_splits + pid_s, lse2, mask=row_ok)


@triton.jit(do_not_specialize=["n_keys", "chunk", "init", "local"])
def _token_votes_vote(
    Q, K, KV_START, ROWS, LSE, VOTES,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
    n_kv_heads, GROUP, n_keys, chunk, init, local, qk_scale,
    HAS_START: tl.constexpr, HAS_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_bk = tl.program_id(0)
    pid_s = tl.program_id(1)
    r = pid_bk // n_kv_heads
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
    row = r * n_kv_heads * GROUP + h
    lse2 = tl.load(LSE + row.to(tl.int64), mask=row_ok, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = VOTES + r.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh

    cand_lo = init
    if HAS_START:
        cand_lo += tl.load(KV_START + b).to(tl.int32)
    cand_hi = n_keys - local
    lo = pid_s * chunk
    hi = tl.minimum(lo + chunk, n_keys)
    # every key of the chunk gets a vote (-inf outside the candidates); only candidate keys are read
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        cand = (offs_n >= cand_lo) & (offs_n < cand_hi)
        k = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None],
                    mask=cand[None, :] & d_ok[:, None], other=0.0)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(qk - lse2[:, None])
        p = tl.where(row_ok[:, None] & cand[None, :], p, 0.0)
        vote = tl.where(cand, tl.sum(p, 0), float("-inf"))
        tl.store(v_base + offs_n, vote, mask=offs_n < hi)


@triton.jit(do_not_specialize=["n_sel", "chunk"])
def _select_attention_split(
    Q, K, V, IDX, Out, PART_O, PART_LSE,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ib, stride_in,
    stride_ob, stride_oh, stride_on,
    n_kv_heads, GROUP, NQ, n_sel, chunk, n_splits, qk_scale,
    SINGLE_SPLIT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)  # flat (b, t, hk)
    pid_s = tl.program_id(1)
    hk = pid % n_kv_heads
    t = (pid // n_kv_heads) % NQ
    b = pid // (n_kv_heads * NQ)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < GROUP
    d_ok = offs_d < HEAD_DIM
    h = hk * GROUP + offs_m
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h[:, None].to(tl.int64) * stride_qh + t * stride_qn
                + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    i_base = IDX + b.to(tl.int64) * stride_ib + t.to(tl.int64) * stride_in

    lo = pid_s * chunk
    hi = tl.minimum(lo + chunk, n_sel)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        idx = tl.load(i_base + offs_n, mask=offs_n < hi, other=-1)
        ok = idx >= 0
        rows = idx.to(tl.int64)
        # gathered rows: each one a contiguous head_dim vector
        k = tl.load(k_base + rows[None, :] * stride_kn + offs_d[:, None], mask=ok[None, :] & d_ok[:, None],
                    other=0.0)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION)
        qk = tl.where(ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + rows[:, None] * stride_vn + offs_d[None, :], mask=ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    out_mask = row_ok[:, None] & d_ok[None, :]
    if SINGLE_SPLIT:
        o_ptrs = Out + b.to(tl.int64) * stride_ob + h[:, None].to(tl.int64) * stride_oh + t * stride_on \
            + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=out_mask)
    else:
        # the merge kernel's layout: partials [B, H, NQ, n_splits, BLOCK_D], log2-sum-exp [B, H, NQ, n_splits]
        row = (b * n_kv_heads * GROUP + h) * NQ + t
        part = row.to(tl.int64) * n_splits + pid_s
        tl.store(PART_O + part[:, None] * BLOCK_D + offs_d[None, :], out, mask=out_mask)
        lse2 = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(PART_LSE + part, lse2, mask=row_ok)


# --------------------------------------------------------------------------------------------------- configs
# the vote passes read contiguous keys like the full-layer decode kernel and share its candidates; the gathers
# load one row per index, so shorter tiles with more stages in flight
GATHER_CONFIGS = [
    decode_config(64, 4, 3),
    decode_config(32, 4, 4),
    decode_config(64, 4, 4),
    decode_config(32, 2, 3),
    decode_config(64, 8, 3),
]


@functools.cache
def _launcher(which: str, cap: tuple[int, int], block_d: int, block_m: int, autotune: bool, element_bytes: int):
    if which == "stats":
        return tuned_launcher(_token_votes_stats, CONTIGUOUS_CONFIGS, cap, block_d, block_m, autotune, element_bytes,
                              key=_VOTE_KEY)
    if which == "vote":
        return tuned_launcher(_token_votes_vote, CONTIGUOUS_CONFIGS, cap, block_d, block_m, autotune, element_bytes,
                              key=_VOTE_KEY)
    return tuned_launcher(_select_attention_split, GATHER_CONFIGS, cap, block_d, block_m, autotune, element_bytes)


def _last_dim_contiguous(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def token_votes_triton(q: torch.Tensor, k: torch.Tensor, *, init: int, local: int, kv_start: torch.Tensor | None,
                       scale: float, splits: int | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the two vote passes on validated inputs (see :func:`~lighttransfer.kernels.token_select.token_votes`);
    returns ``[batch, kv_heads, N]`` float32, or ``[len(rows), kv_heads, N]`` for the sequences ``rows``."""
    q, k = _last_dim_contiguous(q, k)
    _, heads, _, dim = q.shape
    kv_heads, n_keys = k.shape[1], k.shape[2]
    group = heads // kv_heads
    if rows is not None:
        rows = rows.to(device=q.device, dtype=torch.int32).contiguous()
    batch = q.shape[0] if rows is None else rows.numel()
    votes = torch.empty((batch, kv_heads, n_keys), dtype=torch.float32, device=q.device)
    if batch == 0:
        return votes
    if n_keys == 0:
        return votes
    block_d = max(16, triton.next_power_of_2(dim))
    block_m = max(16, triton.next_power_of_2(group))
    if q.is_cuda:
        wanted = 4 * multiprocessors(device_index(q))
        chunk, n_splits = plan_splits(batch, kv_heads, n_keys, wanted, align=_VOTE_ALIGN, splits=splits)
    else:
        chunk, n_splits = plan_splits(batch, kv_heads, n_keys, 1, align=INTERPRETER_CONFIG.kwargs["BLOCK_N"],
                                      splits=splits)
    start = None
    if kv_start is not None:
        start = kv_start.to(device=q.device, dtype=torch.int32).contiguous()
    part = torch.empty((batch, heads, n_splits), dtype=torch.float32, device=q.device)
    flags = dict(HAS_START=start is not None, HAS_ROWS=rows is not None, HEAD_DIM=dim, BLOCK_D=block_d,
                 BLOCK_M=block_m, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    qk_scale = scale * _LOG2E
    grid = (batch * kv_heads, n_splits)
    start_arg = start if start is not None else part
    rows_arg = rows if rows is not None else part

    def stats(kernel, extra):
        kernel[grid](q, k, start_arg, rows_arg, part, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                     k.stride(2), kv_heads, group, n_keys, chunk, n_splits, int(init), int(local), qk_scale, **flags,
                     **extra)

    def vote(kernel, extra, lse):
        kernel[grid](q, k, start_arg, rows_arg, lse, votes, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                     k.stride(2),
                     votes.stride(0), votes.stride(1), kv_heads, group, n_keys, chunk, int(init), int(local),
                     qk_scale, **flags, **extra)

    if not q.is_cuda:
        stats(_token_votes_stats, INTERPRETER_CONFIG.kwargs)
        vote(_token_votes_vote, INTERPRETER_CONFIG.kwargs, _merge_lse2(part))
        return votes
    index = device_index(q)
    cap, tune = capability(index), autotune_enabled()
    with torch.cuda.device(index):
        size = q.element_size()
        stats(_launcher("stats", cap, block_d, block_m, tune, size), {})
        vote(_launcher("vote", cap, block_d, block_m, tune, size), {}, _merge_lse2(part))
    return votes


def _merge_lse2(part: torch.Tensor) -> torch.Tensor:
    """``[batch, heads, n_splits]`` per-chunk log2-sum-exp -> ``[batch, heads]`` (``-inf`` where all are)."""
    if part.shape[-1] == 1:
        return part[..., 0].contiguous()
    top = part.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return (top.squeeze(-1) + torch.log2(torch.exp2(part - top).sum(-1))).contiguous()


def select_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, *,
                            scale: float, splits: int | None = None) -> torch.Tensor:
    """Launch the gather kernel and the merge on validated inputs (see
    :func:`~lighttransfer.kernels.token_select.select_attention`)."""
    q, k, v = _last_dim_contiguous(q, k, v)
    batch, heads, nq, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    if indices.dtype not in (torch.int32, torch.int64) or indices.stride(-1) != 1:
        indices = indices.to(torch.int32).contiguous()
    indices = indices.to(q.device)
    n_sel = indices.shape[2]
    o = torch.empty((batch, heads, nq, dim), dtype=q.dtype, device=q.device)
    if n_sel == 0:
        return o.zero_()
    block_d = max(16, triton.next_power_of_2(dim))
    block_m = max(16, triton.next_power_of_2(group))
    if q.is_cuda:
        wanted = 4 * multiprocessors(device_index(q))
        chunk, n_splits = plan_splits(batch * nq, kv_heads, n_sel, wanted, align=_GATHER_ALIGN, splits=splits)
    else:
        chunk, n_splits = plan_splits(batch * nq, kv_heads, n_sel, 1, align=INTERPRETER_CONFIG.kwargs["BLOCK_N"],
                                      splits=splits)
    single = n_splits == 1
    if single:
        part_o = part_lse = o
    else:
        part_o = torch.empty((batch, heads, nq, n_splits, block_d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, heads, nq, n_splits), dtype=torch.float32, device=q.device)
    args = (
        q, k, v, indices, o, part_o, part_lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        indices.stride(0), indices.stride(1),
        o.stride(0), o.stride(1), o.stride(2),
        kv_heads, group, nq, n_sel, chunk, n_splits, scale * _LOG2E,
    )
    flags = dict(SINGLE_SPLIT=single, HEAD_DIM=dim, BLOCK_D=block_d, BLOCK_M=block_m,
                 DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    grid = (batch * nq * kv_heads, n_splits)

    def launch(kernel, extra):
        kernel[grid](*args, **flags, **extra)
        if not single:
            _streaming_decode_merge[(batch * heads * nq,)](
                part_o, part_lse, o, heads, nq, n_splits, o.stride(0), o.stride(1), o.stride(2),
                HEAD_DIM=dim, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(n_splits)),
            )

    if not q.is_cuda:
        launch(_select_attention_split, INTERPRETER_CONFIG.kwargs)
        return o
    index = device_index(q)
    with torch.cuda.device(index):
        launch(_launcher("gather", capability(index), block_d, block_m, autotune_enabled(), q.element_size()), {})
    return o


def bytes_read(*, batch: int, kv_heads: int, head_dim: int, dtype_bytes: int, n_keys: int, n_selected: int,
               init: int = 0, local: int = 0) -> dict[str, int]:
    """The floor of each part of a decode step in bytes: the two vote passes read the candidate keys twice; the
    gather reads the selected K and V rows and their indices; dense flash-decoding reads every K and V once."""
    row = kv_heads * head_dim * dtype_bytes
    cand = max(0, n_keys - init - local)
    return {"votes": batch * 2 * cand * row, "attention": batch * (2 * n_selected * row + 4 * n_selected),
            "dense": batch * 2 * n_keys * row}


__all__ = ["token_votes_triton", "select_attention_triton", "GATHER_CONFIGS", "bytes_read"]
