"""Triton kernel for sink + sliding-window attention over a whole prompt (prefill and chunked prefill).

FlashAttention-2 forward (online softmax, one program per ``BLOCK_M`` queries of one head), restricted to the
key tiles a query block can see. For queries ``qi`` in ``[q_lo, q_hi]`` (key-index space, ``qi = q_offset + i``)
the visible keys are the sink ``[kv_start, kv_start + sink)`` and the window ``(qi - window, qi]``.

Key tiles are walked in a *virtual* key order: the ``n_s`` sink keys first, then the window keys from
``win_lo`` on, so the sink shares the first tile with the oldest window keys instead of costing a tile of its
own (virtual index ``x < win_lo`` reads key ``x + kv_lo - vlo``). The walk is split into masked edge tiles (the
sink, the window's trailing edge, the causal diagonal) and interior tiles that every query of the block sees in
full (no mask arithmetic at all); layouts of these loops are tile configs, see ``_config``.

Nothing outside those ranges is loaded, so the cost is ``O(n * (sink + window + BLOCK_M))``, not ``O(n * N)``.
A full-attention head (``stream_heads[h] == False``) is the same walk with ``sink = 0`` and an unbounded window.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .decode_launch import (
    HOPPER_SHARED_MEMORY,
    OTHER_SHARED_MEMORY,
    SHARED_MEMORY_MARGIN,
    autotune_enabled,
    device_index,
    multiprocessors,
)

# An "unbounded" window / sink for full-attention heads; positions stay far below it.
_UNBOUNDED = tl.constexpr(1 << 30)
_LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _attn_tiles(
    acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn, offs_d, qi, sink_at, win,
    lo, hi, key_bound, qk_scale,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr, SINK_TERM: tl.constexpr, USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online-softmax update over the key tiles ``[lo, hi)``.

    ``MASKED`` tiles apply the rule per element: key ``j`` is visible to row ``qi`` when ``j < key_bound`` and
    ``0 <= qi - j < win`` (or, with ``SINK_TERM``, ``j < sink_at``); ``sink_at``/``win`` are per row
    ``[BLOCK_M]``. ``USE_TMA`` loads K/V tiles through tensor descriptors (rows past the tensor read as zero).
    """
    d_ok = offs_d < HEAD_DIM
    win_u = win.to(tl.uint32)
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < key_bound
        if USE_TMA:
            k = tl.trans(k_desc.load([start_n, 0]))
        elif MASKED:
            k = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None],
                        other=0.0)
        elif HEAD_DIM == BLOCK_D:
            k = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None])
        else:
            k = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=d_ok[:, None], other=0.0)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION)
        if MASKED:
            rel = qi[:, None] - offs_n[None, :]
            # one unsigned compare covers both 0 <= rel and rel < win
            visible = n_ok[None, :] & (rel.to(tl.uint32) < win_u[:, None])
            if SINK_TERM:
                visible = n_ok[None, :] & (rel >= 0) & ((offs_n[None, :] < sink_at[:, None]) | (rel < win[:, None]))
            qk = tl.where(visible, qk, float("-inf"))
        # scale folded into one FMA per score (qk_scale > 0, so the max commutes with it)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if USE_TMA:
            v = v_desc.load([start_n, 0])
            if MASKED:
                # padding rows inside the tensor are real memory: keep a stray nan there out of p @ v
                v = tl.where(n_ok[:, None], v, 0.0)
        elif MASKED:
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                        other=0.0)
        elif HEAD_DIM == BLOCK_D:
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :])
        else:
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _masked_scores(qk, offs_n, n_ok, qi, sink_at, win):
    """``qk [BLOCK_M, BLOCK_N]`` with the invisible pairs set to ``-inf``: key ``offs_n`` is visible to row ``qi``
    when it is causal and in the sink (``< sink_at``) or the window (``qi - offs_n < win``)."""
    rel = qi[:, None] - offs_n[None, :]
    visible = n_ok[None, :] & (rel >= 0) & ((offs_n[None, :] < sink_at[:, None]) | (rel < win[:, None]))
    return tl.where(visible, qk, float("-inf"))


@triton.jit
def _attn_edge_tiles(
    acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_d, qi, sink_at, win,
    kv_lo, sink_end, n_sink, vlo, n_lead, tail_lo, n_tail, win_lo, v_end, shift, qk_scale,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """All masked tiles of a program in ONE pipelined loop: ``n_sink`` sink tiles from ``kv_lo`` (zero when the
    sink rides in the first window tile), ``n_lead`` tiles of the virtual key walk from ``vlo`` and ``n_tail``
    diagonal tiles from ``tail_lo``. Virtual indices below ``win_lo`` read the sink keys (``+ shift``).
    Separate short loops would each wait for their first load; here the next edge tile's loads overlap."""
    d_ok = offs_d < HEAD_DIM
    for t in tl.range(0, n_sink + n_lead + n_tail):
        in_sink = t < n_sink
        start_n = tl.where(in_sink, kv_lo + t * BLOCK_N,
                           tl.where(t < n_sink + n_lead, vlo + (t - n_sink) * BLOCK_N,
                                    tail_lo + (t - n_sink - n_lead) * BLOCK_N))
        offs_x = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_x < tl.where(in_sink, sink_end, v_end)
        offs_n = tl.where(offs_x < win_lo, offs_x + shift, offs_x)
        k = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None],
                    other=0.0)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION)
        qk = _masked_scores(qk, offs_n, n_ok, qi, sink_at, win)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_all_tiles(
    acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_d, qi, sink_at, win,
    vlo, n_lead, n_mid, n_tail, win_lo, v_end, shift, qk_scale,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Every tile of the virtual key walk in ONE pipelined loop (one pipeline fill per program): the tiles are
    contiguous from ``vlo``; only the first ``n_lead`` and the last ``n_tail`` pay for the mask, behind a
    branch that is uniform across the program."""
    d_ok = offs_d < HEAD_DIM
    mid_end = n_lead + n_mid
    for t in tl.range(0, mid_end + n_tail):
        offs_x = vlo + t * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_x < v_end
        offs_n = tl.where(offs_x < win_lo, offs_x + shift, offs_x)
        k = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None],
                    other=0.0)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION)
        if (t < n_lead) | (t >= mid_end):
            qk = _masked_scores(qk, offs_n, n_ok, qi, sink_at, win)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_block(
    pid_m, pid_bh, Q, K, V, Out, LSE, KV_START, KV_LEN, STREAM_HEADS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_lb, stride_lh,
    H, GROUP, n_q, n_kv, q_offset, sink, window, qk_scale,
    HAS_KV_START: tl.constexpr, HAS_KV_LEN: tl.constexpr, HAS_STREAM_HEADS: tl.constexpr,
    RETURN_LSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SINK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PACK: tl.constexpr, MERGED_EDGES: tl.constexpr,
    SINK_IN_WINDOW: tl.constexpr, ONE_LOOP: tl.constexpr, USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One query block (``pid_m``) of one group of ``PACK`` query heads (``pid_bh``): load Q, walk the visible
    key tiles, store O (and the log-sum-exp)."""
    # A tile row m is query position start + m % ROWS of query head h0 + m // ROWS: the PACK heads of one KV
    # head share every K/V tile, and the window edge costs ROWS (not BLOCK_M) extra keys per query block.
    ROWS = BLOCK_M // PACK
    b = pid_bh // (H // PACK)
    h0 = (pid_bh % (H // PACK)) * PACK
    hk = h0 // GROUP

    kv_lo = 0
    kv_hi = n_kv
    if HAS_KV_START:
        kv_lo = tl.load(KV_START + b)
    if HAS_KV_LEN:
        kv_hi = tl.load(KV_LEN + b)

    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    h = h0 + offs_r // ROWS
    start_m = pid_m * ROWS
    offs_m = start_m + offs_r % ROWS
    qi = q_offset + offs_m  # each query's own key index
    q_lo = q_offset + start_m
    q_hi = q_offset + tl.minimum(start_m + ROWS, n_q) - 1

    # per-row rule: streaming rows see [kv_lo, kv_lo + sink) and (qi - window, qi]; full rows see all causal keys
    if HAS_STREAM_HEADS:
        streaming = tl.load(STREAM_HEADS + h) != 0
        sink_at = tl.where(streaming, kv_lo + sink, kv_lo)
        win = tl.where(streaming, window, _UNBOUNDED)
    else:
        sink_at = tl.zeros([BLOCK_M], dtype=tl.int32) + (kv_lo + sink)
        win = tl.zeros([BLOCK_M], dtype=tl.int32) + window
    sink_hi = tl.max(sink_at, 0)
    win_max = tl.max(win, 0)
    win_min = tl.min(win, 0)

    q_base = Q + b.to(tl.int64) * stride_qb
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    if USE_TMA:
        k_desc = tl.make_tensor_descriptor(k_base, shape=[n_kv, HEAD_DIM], strides=[stride_kn, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[n_kv, HEAD_DIM], strides=[stride_vn, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        ks_desc = tl.make_tensor_descriptor(k_base, shape=[n_kv, HEAD_DIM], strides=[stride_kn, 1],
                                            block_shape=[BLOCK_SINK, BLOCK_D])
        vs_desc = tl.make_tensor_descriptor(v_base, shape=[n_kv, HEAD_DIM], strides=[stride_vn, 1],
                                            block_shape=[BLOCK_SINK, BLOCK_D])
    else:
        k_desc = k_base
        v_desc = v_base
        ks_desc = k_base
        vs_desc = v_base
    row_ok = offs_m < n_q
    q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q_ptrs = q_base + h[:, None].to(tl.int64) * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)

    # finite start for the running max so that fully masked rows give p = 0, not nan
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    sink_end = tl.minimum(tl.minimum(sink_hi, q_hi + 1), kv_hi)
    win_lo = tl.maximum(q_lo - win_max + 1, sink_end)
    win_hi = tl.minimum(q_hi + 1, kv_hi)
    if MERGED_EDGES:
        # virtual key walk [vlo, v_end): the n_s sink keys (if folded in), then the window keys [win_lo, win_hi)
        n_s = tl.maximum(sink_end - kv_lo, 0)
        v_end = tl.maximum(win_hi, win_lo)
        if SINK_IN_WINDOW:
            vlo = win_lo - n_s
            shift = kv_lo - vlo
            n_sink = 0
        else:
            vlo = win_lo
            shift = 0
            n_sink = (n_s + BLOCK_N - 1) // BLOCK_N
        # lead (masked) tiles up to the first key all rows see, an unmasked interior, masked diagonal tiles
        full_lo = tl.maximum(q_hi - win_min + 1, win_lo)
        full_hi = tl.minimum(q_lo + 1, kv_hi)
        n_lead = (tl.maximum(tl.minimum(full_lo, v_end) - vlo, 0) + BLOCK_N - 1) // BLOCK_N
        mid_lo = vlo + n_lead * BLOCK_N
        n_mid = tl.maximum(full_hi - mid_lo, 0) // BLOCK_N
        mid_hi = mid_lo + n_mid * BLOCK_N
        n_tail = (tl.maximum(v_end - mid_hi, 0) + BLOCK_N - 1) // BLOCK_N
        if ONE_LOOP:
            acc, l_i, m_i = _attn_all_tiles(
                acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_d, qi, sink_at, win,
                vlo, n_lead, n_mid, n_tail, win_lo, v_end, shift, qk_scale,
                BLOCK_N, HEAD_DIM, BLOCK_D, DOT_PRECISION,
            )
        else:
            acc, l_i, m_i = _attn_edge_tiles(
                acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_d, qi, sink_at, win,
                kv_lo, sink_end, n_sink, vlo, n_lead, mid_hi, n_tail, win_lo, v_end, shift, qk_scale,
                BLOCK_N, HEAD_DIM, BLOCK_D, DOT_PRECISION,
            )
            acc, l_i, m_i = _attn_tiles(
                acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn, offs_d, qi, sink_at,
                win, mid_lo, mid_hi, win_hi, qk_scale,
                BLOCK_N, HEAD_DIM, BLOCK_D, False, False, USE_TMA, DOT_PRECISION,
            )
    else:
        # 1) sink tiles [kv_lo, sink_end), narrow (BLOCK_SINK) because the sink is often a handful of tokens
        acc, l_i, m_i = _attn_tiles(
            acc, l_i, m_i, q, k_base, v_base, ks_desc, vs_desc, stride_kn, stride_vn, offs_d, qi, sink_at, win,
            kv_lo, sink_end, sink_end, qk_scale,
            BLOCK_SINK, HEAD_DIM, BLOCK_D, True, True, USE_TMA, DOT_PRECISION,
        )

        # 2) window tiles [win_lo, win_hi) past sink_end (no key counted twice): masked edge tiles around an
        #    interior [mid_lo, mid_hi) that every row of the block sees in full
        full_lo = tl.maximum(q_hi - win_min + 1, win_lo)
        full_hi = tl.minimum(q_lo + 1, kv_hi)
        n_lead = (tl.maximum(full_lo - win_lo, 0) + BLOCK_N - 1) // BLOCK_N
        mid_lo = win_lo + n_lead * BLOCK_N
        mid_hi = mid_lo + (tl.maximum(full_hi - mid_lo, 0) // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _attn_tiles(
            acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn, offs_d, qi, sink_at, win,
            win_lo, tl.minimum(mid_lo, win_hi), win_hi, qk_scale,
            BLOCK_N, HEAD_DIM, BLOCK_D, True, False, USE_TMA, DOT_PRECISION,
        )
        acc, l_i, m_i = _attn_tiles(
            acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn, offs_d, qi, sink_at, win,
            mid_lo, mid_hi, win_hi, qk_scale,
            BLOCK_N, HEAD_DIM, BLOCK_D, False, False, USE_TMA, DOT_PRECISION,
        )
        acc, l_i, m_i = _attn_tiles(
            acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn, offs_d, qi, sink_at, win,
            mid_hi, win_hi, win_hi, qk_scale,
            BLOCK_N, HEAD_DIM, BLOCK_D, True, False, USE_TMA, DOT_PRECISION,
        )

    # rows that saw no key (padding) get zeros and lse = -inf
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_ptrs = (Out + b.to(tl.int64) * stride_ob + h[:, None].to(tl.int64) * stride_oh + offs_m[:, None] * stride_on
              + offs_d[None, :])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=q_mask)
    if RETURN_LSE:
        lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * _LN2, float("-inf"))
        l_ptrs = LSE + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + offs_m
        tl.store(l_ptrs, lse, mask=row_ok)


@triton.jit
def _streaming_attn_fwd(
    Q, K, V, Out, LSE, KV_START, KV_LEN, STREAM_HEADS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_lb, stride_lh,
    batch, H, GROUP, n_q, n_kv, q_offset, sink, window, qk_scale, size_class, band_class,
    HAS_KV_START: tl.constexpr, HAS_KV_LEN: tl.constexpr, HAS_STREAM_HEADS: tl.constexpr,
    RETURN_LSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SINK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PACK: tl.constexpr, MERGED_EDGES: tl.constexpr,
    SINK_IN_WINDOW: tl.constexpr, ONE_LOOP: tl.constexpr, PERSISTENT: tl.constexpr, FLATTEN: tl.constexpr,
    USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # grid (query blocks, batch * heads / PACK); PERSISTENT > 0: a 1-D grid of PERSISTENT programs per SM, each
    # walking work items (query block, head group) strided by the grid size, neighbours in the same head group
    if PERSISTENT > 0:
        n_mblocks = tl.cdiv(n_q, BLOCK_M // PACK)
        n_items = n_mblocks * (batch * (H // PACK))
        for item in tl.range(tl.program_id(0), n_items, tl.num_programs(0), flatten=FLATTEN):
            _attn_block(
                item % n_mblocks, item // n_mblocks, Q, K, V, Out, LSE, KV_START, KV_LEN, STREAM_HEADS,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                stride_ob, stride_oh, stride_on, stride_lb, stride_lh,
                H, GROUP, n_q, n_kv, q_offset, sink, window, qk_scale,
                HAS_KV_START, HAS_KV_LEN, HAS_STREAM_HEADS, RETURN_LSE, HEAD_DIM, BLOCK_D, BLOCK_SINK,
                BLOCK_M, BLOCK_N, PACK, MERGED_EDGES, SINK_IN_WINDOW, ONE_LOOP, USE_TMA, DOT_PRECISION,
            )
    else:
        _attn_block(
            tl.program_id(0), tl.program_id(1), Q, K, V, Out, LSE, KV_START, KV_LEN, STREAM_HEADS,
            stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
            stride_ob, stride_oh, stride_on, stride_lb, stride_lh,
            H, GROUP, n_q, n_kv, q_offset, sink, window, qk_scale,
            HAS_KV_START, HAS_KV_LEN, HAS_STREAM_HEADS, RETURN_LSE, HEAD_DIM, BLOCK_D, BLOCK_SINK,
            BLOCK_M, BLOCK_N, PACK, MERGED_EDGES, SINK_IN_WINDOW, ONE_LOOP, USE_TMA, DOT_PRECISION,
        )


# --------------------------------------------------------------------------------------------------- configs
def _config(block_m: int, block_n: int, warps: int, stages: int, merged: bool = True, *,
            sink_in_window: bool = True, one_loop: bool = False, persistent: int = 0,
            flatten: bool = False) -> triton.Config:
    """A tile config and loop layout.

    ``merged``: masked tiles in one loop, then the interior (else: sink, lead, interior, tail loops, each with its
    own pipeline fill). ``sink_in_window`` (merged layouts): the sink keys ride in the first window tile instead
    of a tile of their own. ``one_loop``: every tile in one loop, the mask behind a branch. ``persistent``:
    that many programs per SM, each walking several query blocks (``flatten`` asks Triton to fuse that loop
    nest into one pipelined loop).
    """
    if one_loop and not (merged and sink_in_window):
        raise ValueError("one_loop needs the merged layout with the sink in the window walk")
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "MERGED_EDGES": merged,
                          "SINK_IN_WINDOW": sink_in_window, "ONE_LOOP": one_loop, "PERSISTENT": persistent,
                          "FLATTEN": flatten}, num_warps=warps, num_stages=stages)


# Candidates for the H100 (see NOTES.md for the sweeps behind them); the first is the default when autotuning
# is off. Measured slower and therefore not candidates: BLOCK_N = 128 with 4 warps, 4 stages, TMA loads, 2 stages
# at BLOCK_N = 64, the four-loop layout at 64 rows, persistent 64-row programs.
HOPPER_CONFIGS = [
    _config(128, 64, 8, 3, one_loop=True, persistent=1, flatten=True),
    _config(128, 64, 8, 3, one_loop=True, persistent=1),
    _config(128, 64, 8, 3, one_loop=True),
    _config(128, 64, 8, 3),
    _config(128, 64, 8, 3, merged=False),
    _config(64, 64, 4, 3, one_loop=True),
    _config(64, 64, 4, 3),
    _config(128, 128, 8, 2),
]
# Layouts timed by the benchmark sweep but not autotuned: the best config before the sink rode in the window
# walk (the baseline of every sweep), and layouts kept for comparison.
PREVIOUS_DEFAULT = _config(128, 64, 8, 3, sink_in_window=False)
EXPERIMENTAL_CONFIGS = [
    _config(128, 64, 8, 3, persistent=1),
    _config(64, 64, 4, 3, one_loop=True, persistent=2),
]
# Works on any CUDA GPU with 64 KB of shared memory per block (Ampere and newer, also older cards) at bf16/fp16
# and head sizes up to 128; smaller tiles where even it does not fit (fp32 at head size 256 needs 327 KB with it).
FALLBACK_CONFIG = _config(64, 64, 4, 2)
_SMALLER_FALLBACKS = (_config(32, 32, 4, 2), _config(16, 16, 4, 1))
# Triton's interpreter runs programs one by one on the CPU: small tiles keep tests quick.
INTERPRETER_CONFIG = _config(16, 16, 1, 1)
# "SMs" of the interpreter, so that a persistent grid there still walks several items per program
_INTERPRETER_SMS = 2


def fits_hopper(config: triton.Config, block_d: int, element_bytes: int = 2,
                limit: int = HOPPER_SHARED_MEMORY) -> bool:
    """Keep configs whose pipelined K/V tiles and Q tile (elements of ``element_bytes``) fit ``limit`` bytes of
    shared memory per block (the H100/H200's 227 KB) with Triton's margin, and whose accumulator stays in
    registers (``BLOCK_M * BLOCK_D`` fp32 over the warps' register file)."""
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    smem = element_bytes * (bm * block_d + config.num_stages * 2 * bn * block_d) + SHARED_MEMORY_MARGIN
    acc_regs_per_thread = bm * block_d // (32 * config.num_warps)
    return smem <= limit and acc_regs_per_thread <= 128 and not (block_d > 128 and bn > 64)


def fallback_config(block_d: int, element_bytes: int = 2, limit: int = OTHER_SHARED_MEMORY) -> triton.Config:
    """The fallback config, or the first smaller one that fits ``limit`` (the smallest when none does)."""
    chain = (FALLBACK_CONFIG, *_SMALLER_FALLBACKS)
    return next((c for c in chain if fits_hopper(c, block_d, element_bytes, limit)), chain[-1])


def head_pack(group: int, block_m: int) -> int:
    """Query heads of one KV head stacked in a tile: the largest power of two dividing ``group`` that still
    leaves at least 4 query positions per head in ``block_m`` rows."""
    pack = 1
    while group % (pack * 2) == 0 and block_m // (pack * 2) >= 4:
        pack *= 2
    return pack


def _grid(n: int, batch: int, heads: int, group: int, sms: int):
    def grid(meta):
        pack = head_pack(group, meta["BLOCK_M"])
        blocks, head_groups = triton.cdiv(n, meta["BLOCK_M"] // pack), batch * heads // pack
        if meta.get("PERSISTENT", 0):
            return (min(blocks * head_groups, sms * meta["PERSISTENT"]),)
        return (blocks, head_groups)

    return grid


def tma_allowed(*tensors: torch.Tensor) -> bool:
    """Whether to load K/V through tensor descriptors (TMA): only when ``LIGHTTRANSFER_TRITON_TMA=1`` (measured
    slower than pointer loads with Triton 3.6 on the H100, see NOTES.md) and the tensors allow it (sm_90+,
    16-byte aligned bases and strides, unit last stride). The merged edge tiles always use pointer loads."""
    if os.environ.get("LIGHTTRANSFER_TRITON_TMA", "0") != "1":
        return False
    t0 = tensors[0]
    if t0.is_cuda and torch.cuda.get_device_capability(t0.device)[0] < 9:
        return False
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any((st * size) % 16 for st in t.stride()[:-1]) or t.stride(-1) != 1:
            return False
    return True


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _scratch_cpu(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8)


_PACK_HEURISTIC = {"PACK": lambda args: head_pack(args["GROUP"], args["BLOCK_M"])}


@functools.cache
def _tuned_launcher(capability: tuple[int, int], block_d: int, autotune: bool, element_bytes: int = 2):
    if capability[0] == 9:
        configs = [c for c in HOPPER_CONFIGS if fits_hopper(c, block_d, element_bytes)] \
            or [fallback_config(block_d, element_bytes, HOPPER_SHARED_MEMORY)]
    else:
        configs = [fallback_config(block_d, element_bytes)]
    if not autotune:
        configs = configs[:1]
    kernel = triton.heuristics(_PACK_HEURISTIC)(_streaming_attn_fwd)
    key = ["HEAD_DIM", "GROUP", "HAS_STREAM_HEADS", "USE_TMA", "size_class", "band_class"]
    return triton.autotune(configs=configs, key=key)(kernel)


def size_class(rows: int) -> int:
    """Autotuning bucket of the query rows (batch * heads * n): small grids prefer smaller tiles, and one
    tuning per bucket keeps varying prompt lengths from re-tuning at every call."""
    return min(max(rows.bit_length() - 17, 0), 4)


def band_class(sink: int, window: int) -> int:
    """Autotuning bucket of the band width: a 1k and a 4k band prefer different tiles (fixed cost per program
    vs work per program), so they are tuned apart; powers of two keep the buckets few."""
    return min((sink + window).bit_length(), 24)


def _as_int32(t: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if t is None else t.to(device=device, dtype=torch.int32).contiguous()


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def streaming_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sink: int,
    window: int,
    q_offset: int,
    kv_start: torch.Tensor | None,
    kv_len: torch.Tensor | None,
    scale: float,
    stream_heads: torch.Tensor | None,
    return_lse: bool,
    config: triton.Config | None = None,
    use_tma: bool | None = None,
):
    """Launch the kernel on validated inputs (see ``streaming_attention``). Returns ``(o, lse or None)``.

    ``config``/``use_tma`` pin a tile config and the load path (benchmark sweeps); by default CUDA autotunes
    and uses TMA where :func:`tma_allowed`.
    """
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    batch, heads, n, dim = q.shape
    kv_heads, n_kv = k.shape[1], k.shape[2]
    group = heads // kv_heads
    o = torch.empty((batch, heads, n, dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, n), dtype=torch.float32, device=q.device) if return_lse else None
    starts = _as_int32(kv_start, q.device)
    lens = _as_int32(kv_len, q.device)
    modes = None if stream_heads is None else stream_heads.to(device=q.device, dtype=torch.int8).contiguous()
    block_d = max(16, triton.next_power_of_2(dim))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    tma = tma_allowed(k, v) if use_tma is None else use_tma
    lse_arg = lse if lse is not None else o
    args = (
        q, k, v, o, lse_arg,
        starts if starts is not None else o, lens if lens is not None else o, modes if modes is not None else o,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        lse_arg.stride(0), lse_arg.stride(1),
        batch, heads, group, n, n_kv, q_offset, sink, window, scale * _LOG2E, size_class(batch * heads * n),
        band_class(sink, window),
    )
    flags = dict(
        HAS_KV_START=starts is not None, HAS_KV_LEN=lens is not None, HAS_STREAM_HEADS=modes is not None,
        RETURN_LSE=return_lse, HEAD_DIM=dim, BLOCK_D=block_d, DOT_PRECISION=precision, USE_TMA=tma,
        # sink tiles narrower than the window tiles: a 4-token sink should not cost a 64-key tile
        BLOCK_SINK=min(64, max(16, triton.next_power_of_2(max(sink, 1)))),
    )
    sms = multiprocessors(device_index(q)) if q.is_cuda else _INTERPRETER_SMS
    grid = _grid(n, batch, heads, group, sms)
    if tma:
        # device-side tensor descriptors live in a small scratch buffer that Triton asks for at launch
        triton.set_allocator(_scratch if q.is_cuda else _scratch_cpu)
    if q.is_cuda:
        with torch.cuda.device(q.device):
            if config is not None:
                meta = dict(config.kwargs, PACK=head_pack(group, config.kwargs["BLOCK_M"]))
                _streaming_attn_fwd[grid(meta)](*args, **flags, **meta, num_warps=config.num_warps,
                                                num_stages=config.num_stages)
            else:
                kernel = _tuned_launcher(torch.cuda.get_device_capability(q.device), block_d, autotune_enabled(),
                                         q.element_size())
                kernel[grid](*args, **flags)
    else:
        meta = dict((config or INTERPRETER_CONFIG).kwargs)
        meta["PACK"] = head_pack(group, meta["BLOCK_M"])
        _streaming_attn_fwd[grid(meta)](*args, **flags, **meta)
    return o, lse


__all__ = ["streaming_attention_triton", "HOPPER_CONFIGS", "EXPERIMENTAL_CONFIGS", "PREVIOUS_DEFAULT",
           "FALLBACK_CONFIG", "fallback_config", "fits_hopper", "head_pack", "tma_allowed"]
