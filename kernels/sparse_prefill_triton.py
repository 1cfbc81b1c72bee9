"""Triton kernel for block-sparse prefill: each query block visits only the key blocks of its list.

FlashAttention-2 forward (online softmax in base 2), walking the ``counts[b, h, qb]`` key blocks of
``indices[b, h, qb, :]`` (:mod:`.block_lists`) in one pipelined loop, one ``BLOCK_N = block_k`` tile per listed
block. GQA: K/V of KV head ``h // GROUP`` are read in place (never repeated). Two layouts of a program:

* unpacked (``PACK = 1``): one program per ``block_q`` queries of one query head; lists per query head or per KV
  head (``LIST_GROUP``). The ``GROUP`` query heads of a KV head load the same K/V tile once each when their lists
  agree.
* packed (``PACK = GROUP``, lists per KV head): one program per (KV head, query block) holding the ``GROUP`` query
  heads stacked as rows of one tile (row ``r`` is query ``qb * block_q + r % block_q`` of query head
  ``hk * GROUP + r // block_q``, as the prefill kernel packs heads), so each listed K/V tile is loaded once per KV
  head and query block and feeds one ``(GROUP * block_q) x block_k`` matmul. ``BLOCK_M`` is ``GROUP * block_q``
  rounded up to a power of two (the extra rows of a group of 3 or 6 are masked).

Only tiles that reach past the block's first query (the diagonal), start before ``kv_start`` (left padding) or end
past ``N`` (the ragged last block) pay for the element mask, behind a branch uniform across the program. Cost:
``O(sum of counts * block_q * block_k)``; tiles not listed are never loaded.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .prefill_triton import HOPPER_SHARED_MEMORY, OTHER_SHARED_MEMORY, autotune_enabled, fits_hopper

_LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _block_sparse_fwd(
    Q, K, V, Out, LSE, IDX, CNT, KV_START,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_lb, stride_lh,
    stride_ib, stride_ih, stride_iq,
    stride_cb, stride_ch,
    H, GROUP, LIST_GROUP, n_q, n_kv, q_offset, qk_scale,
    HAS_KV_START: tl.constexpr, RETURN_LSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, PACK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # PACK query heads (h0 .. h0 + PACK - 1) of ROWS queries each share the tile; PACK = 1 is one head per program
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // (H // PACK)
    h0 = (pid_bh % (H // PACK)) * PACK
    hk = h0 // GROUP
    hl = h0 // LIST_GROUP

    offs_r = tl.arange(0, BLOCK_M)
    head_ok = offs_r < PACK * ROWS  # the padding rows of a group that is not a power of two
    h = h0 + tl.minimum(offs_r // ROWS, PACK - 1)
    offs_m = pid_m * ROWS + offs_r % ROWS
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    qi = q_offset + offs_m  # each query's own key index
    q_lo = q_offset + pid_m * ROWS
    kv_lo = 0
    if HAS_KV_START:
        kv_lo = tl.load(KV_START + b)

    row_ok = (offs_m < n_q) & head_ok
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h[:, None].to(tl.int64) * stride_qh + offs_m[:, None] * stride_qn \
        + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    idx_base = IDX + b.to(tl.int64) * stride_ib + hl.to(tl.int64) * stride_ih + pid_m * stride_iq
    count = tl.load(CNT + b.to(tl.int64) * stride_cb + hl.to(tl.int64) * stride_ch + pid_m)

    # finite start for the running max so that a row that sees nothing gives p = 0, not nan
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for t in tl.range(0, count):
        start_n = tl.load(idx_base + t) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_kv
        k = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None],
                    other=0.0)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION)
        # mask only the diagonal, padding-edge and ragged tiles (a uniform branch)
        if (start_n + BLOCK_N - 1 > q_lo) | (start_n < kv_lo) | (start_n + BLOCK_N > n_kv):
            visible = n_ok[None, :] & (offs_n[None, :] <= qi[:, None]) & (offs_n[None, :] >= kv_lo)
            qk = tl.where(visible, qk, float("-inf"))
        # scale folded into one FMA per score (qk_scale > 0, so the max commutes with it)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    acc = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_ptrs = Out + b.to(tl.int64) * stride_ob + h[:, None].to(tl.int64) * stride_oh + offs_m[:, None] * stride_on \
        + offs_d[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if RETURN_LSE:
        # stored in NATURAL log base: the running max and sum are base 2
        lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * _LN2, float("-inf"))
        tl.store(LSE + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + offs_m, lse, mask=row_ok)


def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


def packed_rows(group: int, block_q: int) -> int:
    """Rows of the packed tile: the ``group`` query heads' ``block_q`` queries, rounded up to a power of two."""
    return triton.next_power_of_2(group * block_q)


def candidate_configs(block_m: int, block_k: int, block_d: int, element_bytes: int, hopper: bool) -> list:
    """Warps/stages for the tile of ``block_m`` rows (``block_q``, or the packed heads' rows) by ``block_k`` keys,
    largest first, kept where they fit the GPU's shared memory (:func:`~.prefill_triton.fits_hopper`, sized by the
    element size); the first is the pinned default (``LIGHTTRANSFER_TRITON_AUTOTUNE=0``)."""
    warps = 8 if block_m >= 128 else 4
    limit = HOPPER_SHARED_MEMORY if hopper else OTHER_SHARED_MEMORY
    chain = [_config(block_m, block_k, warps, s) for s in (3, 2, 1)] + [_config(block_m, block_k, 4, 2)]
    fitting = [c for c in chain if fits_hopper(c, block_d, element_bytes, limit)]
    return fitting or chain[-2:-1]


@functools.cache
def _launcher(capability: tuple[int, int], block_m: int, block_k: int, block_d: int, element_bytes: int,
              autotune: bool):
    configs = candidate_configs(block_m, block_k, block_d, element_bytes, capability[0] == 9)
    if not autotune:
        configs = configs[:1]
    return triton.autotune(configs=configs, key=["HEAD_DIM", "GROUP", "PACK"])(_block_sparse_fwd)


def block_sparse_attention_triton(q, k, v, lists, *, kv_start, scale: float, return_lse: bool, pack: bool = False,
                                  config=None):
    """Launch on validated inputs (see ``block_sparse_attention``); returns ``(o, lse or None)``. ``pack``: the
    packed layout (lists per KV head, checked by the caller). ``config`` pins warps/stages (benchmarks)."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    batch, heads, n, dim = q.shape
    group = heads // k.shape[1]
    list_group = heads // lists.indices.shape[1]
    pack_heads = group if pack else 1
    block_m = packed_rows(group, lists.block_q) if pack else lists.block_q
    idx = lists.indices.to(device=q.device, dtype=torch.int32)
    cnt = lists.counts.to(device=q.device, dtype=torch.int32)
    o = torch.empty((batch, heads, n, dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, n), dtype=torch.float32, device=q.device) if return_lse else None
    lse_arg = lse if lse is not None else o
    starts = None if kv_start is None else kv_start.to(device=q.device, dtype=torch.int32).contiguous()
    block_d = max(16, triton.next_power_of_2(dim))
    args = (
        q, k, v, o, lse_arg, idx, cnt, starts if starts is not None else o,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        lse_arg.stride(0), lse_arg.stride(1),
        idx.stride(0), idx.stride(1), idx.stride(2),
        cnt.stride(0), cnt.stride(1),
        heads, group, list_group, n, k.shape[2], lists.q_offset, scale * _LOG2E,
    )
    flags = dict(HAS_KV_START=starts is not None, RETURN_LSE=return_lse, HEAD_DIM=dim, BLOCK_D=block_d,
                 ROWS=lists.block_q, PACK=pack_heads, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    grid = (triton.cdiv(n, lists.block_q), batch * heads // pack_heads)
    if q.is_cuda and config is None:
        with torch.cuda.device(q.device):
            kernel = _launcher(torch.cuda.get_device_capability(q.device), block_m, lists.block_k, block_d,
                               q.element_size(), autotune_enabled())
            kernel[grid](*args, **flags)
    else:
        config = config or _config(block_m, lists.block_k, 4, 1)
        if config.kwargs["BLOCK_M"] != block_m or config.kwargs["BLOCK_N"] != lists.block_k:
            raise ValueError(f"a pinned config must have the tile {block_m} x {lists.block_k} of these lists")
        launch = dict(num_warps=config.num_warps, num_stages=config.num_stages) if q.is_cuda else {}
        _block_sparse_fwd[grid](*args, **flags, **config.kwargs, **launch)
    return o, lse


__all__ = ["block_sparse_attention_triton", "candidate_configs", "packed_rows"]
