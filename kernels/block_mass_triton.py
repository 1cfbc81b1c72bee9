"""Triton kernel for the estimators' exact softmax rows summed per key block, without materializing the rows.

For ``R`` query rows (sampled rows of SampleAttention, or the reduced antidiagonal rows of XAttention) against
``M`` columns, with row ``r`` seeing columns ``<= limit[r]``: two passes over the column tiles of one row tile,
the first for the running max and sum (base 2), the second for ``exp2(s - m) / l`` summed over each group of
``COLS`` consecutive columns (one key block). Output float32 ``[batch, heads, R, M / COLS]``; the work is
``2 * R * M * D`` multiply-adds, the traffic only Q, K and the block sums (the PyTorch path moves the whole
``R x M`` score matrix several times: at 128k keys, 2 rows per 128-query block, 32 heads, that is ~34 GB a pass).
GQA: row tile of query head ``h`` reads columns of KV head ``h // GROUP`` in place. Any width ``D`` (the
antidiagonal rows are ``stride * head_dim`` wide): the dot products walk it in chunks of at most 128.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _scores(Q, k_base, offs_r, r_ok, offs_c, n_cols, stride_qr, stride_km, qk_scale,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
            DOT_PRECISION: tl.constexpr):
    """Scaled scores ``[BLOCK_R, BLOCK_T]`` summed over ``HEAD_DIM`` in chunks of ``BLOCK_D`` (the antidiagonal
    rows are ``stride * head_dim`` wide). A loop, not unrolled: unrolled, every chunk kept its own shared-memory
    buffers (768 KiB for 16 chunks of 128 at ``D = 2048``, over the H200's 227 KiB)."""
    s = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)
    for d0 in tl.range(0, HEAD_DIM, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        q = tl.load(Q + offs_r[:, None] * stride_qr + offs_d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        k = tl.load(k_base + offs_c[None, :] * stride_km + offs_d[:, None],
                    mask=(offs_c[None, :] < n_cols) & d_ok[:, None], other=0.0)
        s = tl.dot(q, k, s, input_precision=DOT_PRECISION)
    return s * qk_scale


@triton.jit
def _row_block_mass(
    Q, K, LIMIT, Out,
    stride_qb, stride_qh, stride_qr,
    stride_kb, stride_kh, stride_km,
    stride_ob, stride_oh, stride_or,
    H, GROUP, n_rows, n_cols, n_blocks, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
    COLS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < n_rows
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    limit = tl.load(LIMIT + offs_r, mask=r_ok, other=-1)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    hi = tl.minimum(tl.max(limit, 0) + 1, n_cols)

    # pass 1: running max and sum (base 2) over the visible columns
    m_i = tl.full([BLOCK_R], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in tl.range(0, hi, BLOCK_T):
        offs_c = start + tl.arange(0, BLOCK_T)
        s = _scores(q_base, k_base, offs_r, r_ok, offs_c, n_cols, stride_qr, stride_km, qk_scale,
                    HEAD_DIM, BLOCK_D, BLOCK_R, BLOCK_T, DOT_PRECISION)
        s = tl.where(offs_c[None, :] <= limit[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
        m_i = m_new

    # pass 2: normalized probabilities summed per group of COLS columns (one key block)
    inv_l = 1.0 / tl.where(l_i > 0, l_i, 1.0)
    out_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_r[:, None] * stride_or
    for start in tl.range(0, n_cols, BLOCK_T):
        offs_c = start + tl.arange(0, BLOCK_T)
        offs_kb = start // COLS + tl.arange(0, BLOCK_T // COLS)
        if start < hi:
            s = _scores(q_base, k_base, offs_r, r_ok, offs_c, n_cols, stride_qr, stride_km, qk_scale,
                        HEAD_DIM, BLOCK_D, BLOCK_R, BLOCK_T, DOT_PRECISION)
            s = tl.where(offs_c[None, :] <= limit[:, None], s, float("-inf"))
            p = tl.math.exp2(s - m_i[:, None]) * inv_l[:, None]
            mass = tl.sum(tl.reshape(p, [BLOCK_R, BLOCK_T // COLS, COLS]), 2)
        else:
            mass = tl.zeros([BLOCK_R, BLOCK_T // COLS], dtype=tl.float32)
        tl.store(out_base + offs_kb[None, :], mass, mask=r_ok[:, None] & (offs_kb[None, :] < n_blocks))


def row_block_mass_triton(qs: torch.Tensor, k: torch.Tensor, limit: torch.Tensor, *, scale: float,
                          cols_per_block: int) -> torch.Tensor:
    """``qs [B, H, R, D]`` rows, ``k [B, Hkv, M, D]`` columns, ``limit`` int ``[R]`` (last visible column of each
    row); returns float32 ``[B, H, R, ceil(M / cols_per_block)]``: each row's softmax (scale ``scale``) summed over
    consecutive groups of ``cols_per_block`` columns. ``cols_per_block`` must be a power of two."""
    qs = qs if qs.stride(-1) == 1 else qs.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    b, h, r, d = qs.shape
    n_cols = k.shape[2]
    n_blocks = -(-n_cols // cols_per_block)
    out = torch.empty(b, h, r, n_blocks, dtype=torch.float32, device=qs.device)
    config = launch_config(d, cols_per_block, on_gpu=qs.is_cuda)
    grid = (triton.cdiv(r, config["BLOCK_R"]), b * h)
    lim = limit.to(device=qs.device, dtype=torch.int32).contiguous()
    _row_block_mass[grid](
        qs, k, lim, out,
        qs.stride(0), qs.stride(1), qs.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        h, h // k.shape[1], r, n_cols, n_blocks, scale * _LOG2E,
        HEAD_DIM=d, COLS=cols_per_block, DOT_PRECISION="ieee" if qs.dtype == torch.float32 else "tf32", **config,
    )
    return out


def launch_config(head_dim: int, cols_per_block: int, *, on_gpu: bool) -> dict:
    """Tile sizes (and, on a GPU, warps and stages) of :func:`row_block_mass_triton` for rows ``head_dim`` wide."""
    if not on_gpu:  # the interpreter: small tiles are faster
        return dict(BLOCK_D=min(max(16, triton.next_power_of_2(head_dim)), 32), BLOCK_R=16,
                    BLOCK_T=max(cols_per_block, 16))
    # the reduced antidiagonal rows are stride * head_dim wide: the head dim is walked in chunks of 128
    return dict(BLOCK_D=min(max(16, triton.next_power_of_2(head_dim)), 128), BLOCK_R=64,
                BLOCK_T=max(cols_per_block, 64), num_warps=4, num_stages=2)


__all__ = ["launch_config", "row_block_mass_triton"]
