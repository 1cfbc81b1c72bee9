"""Triton kernels for the small element-wise steps of a decoder layer: RMSNorm, rotary embedding, SiLU-and-multiply.

Each one replaces a chain of eager PyTorch kernels (RMSNorm: ~6, the rotary embedding of q and k: ~12, SiLU-mul:
2) by one launch, and rounds where the stock modules round: every intermediate that the eager chain stores in the
model's dtype is rounded to that dtype here too (``.to(OUT).to(fp32)``), so a bf16 model gets the stock values up to
the order of the RMSNorm's sum. The public entry points with their shape checks and the PyTorch references are in
:mod:`.fused_ops`.
"""

from __future__ import annotations

import triton
import triton.language as tl

# RMSNorm rows wider than this are walked in chunks (two passes over the row: sum of squares, then scale)
MAX_NORM_BLOCK = 8192
# elements of one RMSNorm program's tile: narrow rows (Qwen3's per-head norms) are taken several at a time
NORM_TILE = 4096


@triton.jit
def _rms_norm(
    X, W, Out,
    stride_xa, stride_xb, stride_oa, stride_ob,
    n_rows, n_b, n_cols, eps,
    GEMMA: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, CHUNKS: tl.constexpr,
):
    # ROWS rows per program; a row is indexed (a, b), so a head-split view [tokens, heads, dim] needs no copy
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    a = (rows // n_b).to(tl.int64)
    b = (rows % n_b).to(tl.int64)
    x_rows = X + a * stride_xa + b * stride_xb
    o_rows = Out + a * stride_oa + b * stride_ob
    offs = tl.arange(0, BLOCK)

    # mean of squares in fp32 (the stock modules cast to fp32 first)
    acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for c in tl.static_range(CHUNKS):
        cols = c * BLOCK + offs
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        x = tl.load(x_rows[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        acc += x * x
    rstd = tl.rsqrt(tl.sum(acc, axis=1) / n_cols + eps)

    for c in tl.static_range(CHUNKS):
        cols = c * BLOCK + offs
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        xin = tl.load(x_rows[:, None] + cols[None, :], mask=ok, other=0.0)
        w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
        if GEMMA:
            # (x * rstd) * (1 + w) in fp32, one rounding at the end
            y = (xin.to(tl.float32) * rstd[:, None]) * (1.0 + w)
        else:
            # w * (x * rstd).to(input dtype): the normalized row is rounded to the input's dtype first
            y = w * (xin.to(tl.float32) * rstd[:, None]).to(xin.dtype).to(tl.float32)
        tl.store(o_rows[:, None] + cols[None, :], y.to(Out.dtype.element_ty), mask=ok)


@triton.jit
def _rotate_heads(
    X, Out, C, S, x_base, o_base, c_base, stride_xh, stride_oh, n_heads,
    HALF: tl.constexpr, ROT: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # all heads of one token as one [heads, half] tile:
    # out[:half] = x1*c1 - x2*s1, out[half:rot] = x2*c2 + x1*s2 (rotate-half), out[rot:] = x[rot:]
    dt = Out.dtype.element_ty
    heads = tl.arange(0, BLOCK_R)
    offs = tl.arange(0, BLOCK_H)
    ok = (heads < n_heads)[:, None] & (offs < HALF)[None, :]
    x_ptr = X + x_base + heads[:, None].to(tl.int64) * stride_xh + offs[None, :]
    o_ptr = Out + o_base + heads[:, None].to(tl.int64) * stride_oh + offs[None, :]
    x1 = tl.load(x_ptr, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=ok, other=0.0).to(tl.float32)
    c_ok = offs < HALF
    c1 = tl.load(C + c_base + offs, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(C + c_base + HALF + offs, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(S + c_base + offs, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(S + c_base + HALF + offs, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    # each product and the sum rounded to the dtype, as the eager (q * cos) + (rotate_half(q) * sin)
    lo = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
    hi = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    tl.store(o_ptr, lo.to(dt), mask=ok)
    tl.store(o_ptr + HALF, hi.to(dt), mask=ok)
    if ROT < HEAD_DIM:  # partial rotary: the channels past the rotated ones pass through
        rest = ROT + tl.arange(0, BLOCK_D)
        ok_rest = (heads < n_heads)[:, None] & (rest < HEAD_DIM)[None, :]
        xr = X + x_base + heads[:, None].to(tl.int64) * stride_xh + rest[None, :]
        orr = Out + o_base + heads[:, None].to(tl.int64) * stride_oh + rest[None, :]
        tl.store(orr, tl.load(xr, mask=ok_rest, other=0.0).to(dt), mask=ok_rest)


@triton.jit
def _rope_qk(
    Q, K, C, S, QO, KO,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_qob, stride_qoh, stride_qos,
    stride_kob, stride_koh, stride_kos,
    stride_cb, stride_cs,
    n_seq, n_heads, n_kv_heads,
    HALF: tl.constexpr, ROT: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # program (token, 0) rotates the token's q heads, (token, 1) its k heads: one launch for both
    tok = tl.program_id(0)
    b = (tok // n_seq).to(tl.int64)
    s = (tok % n_seq).to(tl.int64)
    c_base = b * stride_cb + s * stride_cs
    if tl.program_id(1) == 0:
        _rotate_heads(Q, QO, C, S, b * stride_qb + s * stride_qs, b * stride_qob + s * stride_qos, c_base,
                      stride_qh, stride_qoh, n_heads, HALF, ROT, HEAD_DIM, BLOCK_Q, BLOCK_H, BLOCK_D)
    else:
        _rotate_heads(K, KO, C, S, b * stride_kb + s * stride_ks, b * stride_kob + s * stride_kos, c_base,
                      stride_kh, stride_koh, n_kv_heads, HALF, ROT, HEAD_DIM, BLOCK_K, BLOCK_H, BLOCK_D)


@triton.jit
def _silu_mul(
    X, Out, stride_x, stride_o, n_rows, n_cols,
    BLOCK: tl.constexpr,
):
    # X row = [gate (n_cols) | up (n_cols)]; out = silu(gate) * up, silu rounded to the dtype as the eager chain.
    # The (row, col) pairs are numbered flat, so short rows still fill a program.
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row = idx // n_cols
    col = idx % n_cols
    ok = row < n_rows
    dt = Out.dtype.element_ty
    g = tl.load(X + row * stride_x + col, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + n_cols + col, mask=ok, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    tl.store(Out + row * stride_o + col, (act * u).to(dt), mask=ok)
