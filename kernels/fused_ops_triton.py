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


@triton.jit
def _rms_norm(
    X, W, Out,
    stride_xa, stride_xb, stride_oa, stride_ob,
    n_b, n_cols, eps,
    GEMMA: tl.constexpr, BLOCK: tl.constexpr, CHUNKS: tl.constexpr,
):
    # one program per row; rows are indexed (a, b) so that a head-split view [tokens, heads, dim] needs no copy
    row = tl.program_id(0)
    a = row // n_b
    b = row % n_b
    x_row = X + a.to(tl.int64) * stride_xa + b.to(tl.int64) * stride_xb
    o_row = Out + a.to(tl.int64) * stride_oa + b.to(tl.int64) * stride_ob
    offs = tl.arange(0, BLOCK)

    # mean of squares in fp32 (the stock modules cast to fp32 first)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for c in tl.static_range(CHUNKS):
        cols = c * BLOCK + offs
        x = tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        acc += x * x
    rstd = tl.rsqrt(tl.sum(acc, axis=0) / n_cols + eps)

    for c in tl.static_range(CHUNKS):
        cols = c * BLOCK + offs
        ok = cols < n_cols
        xin = tl.load(x_row + cols, mask=ok, other=0.0)
        w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        if GEMMA:
            # (x * rstd) * (1 + w) in fp32, one rounding at the end
            y = (xin.to(tl.float32) * rstd) * (1.0 + w)
        else:
            # w * (x * rstd).to(input dtype): the normalized row is rounded to the input's dtype first
            y = w * (xin.to(tl.float32) * rstd).to(xin.dtype).to(tl.float32)
        tl.store(o_row + cols, y.to(Out.dtype.element_ty), mask=ok)


@triton.jit
def _rotate_row(
    X, Out, C, S, x_off, o_off, c_off,
    HALF: tl.constexpr, ROT: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # out[:half] = x1*c1 - x2*s1, out[half:rot] = x2*c2 + x1*s2 (rotate-half), out[rot:] = x[rot:]
    dt = Out.dtype.element_ty
    offs = tl.arange(0, BLOCK_H)
    ok = offs < HALF
    x1 = tl.load(X + x_off + offs, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_off + HALF + offs, mask=ok, other=0.0).to(tl.float32)
    c1 = tl.load(C + c_off + offs, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(C + c_off + HALF + offs, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(S + c_off + offs, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(S + c_off + HALF + offs, mask=ok, other=0.0).to(tl.float32)
    # each product and the sum rounded to the dtype, as the eager (q * cos) + (rotate_half(q) * sin)
    lo = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
    hi = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    tl.store(Out + o_off + offs, lo.to(dt), mask=ok)
    tl.store(Out + o_off + HALF + offs, hi.to(dt), mask=ok)
    if ROT < HEAD_DIM:  # partial rotary: the channels past the rotated ones pass through
        rest = ROT + tl.arange(0, BLOCK_D)
        ok_rest = rest < HEAD_DIM
        tl.store(Out + o_off + rest, tl.load(X + x_off + rest, mask=ok_rest, other=0.0).to(dt), mask=ok_rest)


@triton.jit
def _rope_qk(
    Q, K, C, S, QO, KO,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_qob, stride_qoh, stride_qos,
    stride_kob, stride_koh, stride_kos,
    stride_cb, stride_cs,
    n_seq, n_heads,
    HALF: tl.constexpr, ROT: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # program (token, head): heads 0..n_heads-1 are q's, the rest k's; one launch for both
    tok = tl.program_id(0)
    head = tl.program_id(1)
    b = (tok // n_seq).to(tl.int64)
    s = (tok % n_seq).to(tl.int64)
    c_off = b * stride_cb + s * stride_cs
    if head < n_heads:
        h = head.to(tl.int64)
        _rotate_row(Q, QO, C, S, b * stride_qb + h * stride_qh + s * stride_qs,
                    b * stride_qob + h * stride_qoh + s * stride_qos, c_off,
                    HALF, ROT, HEAD_DIM, BLOCK_H, BLOCK_D)
    else:
        h = (head - n_heads).to(tl.int64)
        _rotate_row(K, KO, C, S, b * stride_kb + h * stride_kh + s * stride_ks,
                    b * stride_kob + h * stride_koh + s * stride_kos, c_off,
                    HALF, ROT, HEAD_DIM, BLOCK_H, BLOCK_D)


@triton.jit
def _silu_mul(
    X, Out, stride_x, stride_o, n_cols,
    BLOCK: tl.constexpr,
):
    # X row = [gate (n_cols) | up (n_cols)]; out = silu(gate) * up, silu rounded to the dtype as the eager chain
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    dt = Out.dtype.element_ty
    g = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + n_cols + cols, mask=ok, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (act * u).to(dt), mask=ok)
