"""RMSNorm, RoPE and SiLU-mul kernels vs their fp32 references (odd sizes, strided views, partial rotary), and the
references vs the stock transformers modules they stand for."""

from __future__ import annotations

import pytest
import torch
from kernel_error_policy import DEVICE, DTYPE_IDS, DTYPES, assert_within_policy
from lighttransfer.errors import LightTransferError
from lighttransfer.kernels import use_reference
from lighttransfer.kernels.fused_ops import (
    apply_rope,
    apply_rope_reference,
    rms_norm,
    rms_norm_reference,
    silu_mul,
    silu_mul_reference,
)


def _randn(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def _check(fn, ref, args32, args_low, dtype, what):
    """Kernel in ``dtype`` against the reference in fp32, with the reference in ``dtype`` setting the slack."""
    out = fn(*args_low)
    expect = ref(*args32)
    low = ref(*args_low)
    for o, r, lo in zip(out if isinstance(out, tuple) else (out,), expect if isinstance(expect, tuple) else (expect,),
                        low if isinstance(low, tuple) else (low,), strict=True):
        assert o.shape == lo.shape and o.dtype == lo.dtype and o.stride()[-1] == 1, what
        assert_within_policy(o, r, lo, dtype, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("style", ["llama", "gemma"])
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 5, 97), (2, 7, 1000), (4, 9000)], ids=lambda s: "x".join(map(str, s)))
def test_rms_norm(shape, style, dtype):
    """Rows of odd widths, one above the chunk width (9000 > 8192: the two-pass walk)."""
    x = _randn(*shape, dtype=dtype, seed=shape[-1], scale=3.0)
    w = _randn(shape[-1], dtype=dtype, seed=1) * 0.5 + (0.0 if style == "gemma" else 1.0)

    def fn(x, w):
        return rms_norm(x, w, eps=1e-6, style=style)

    def ref(x, w):
        return rms_norm_reference(x, w, eps=1e-6, style=style)

    _check(fn, ref, (x.float(), w.float()), (x, w), dtype, f"{style} {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
def test_rms_norm_head_view(dtype):
    """Qwen3's q_norm input: heads split out of a wider fused projection, a view whose rows are not evenly strided."""
    batch, seq, heads, dim, width = 2, 3, 4, 48, 9 * 48
    fused = _randn(batch, seq, width, dtype=dtype, seed=3)
    view = fused[..., 48:48 + heads * dim].view(batch, seq, heads, dim)
    w = _randn(dim, dtype=dtype, seed=4)
    out = rms_norm(view, w, eps=1e-5)
    assert out.is_contiguous()
    assert_within_policy(out, rms_norm_reference(view.float(), w.float(), eps=1e-5),
                         rms_norm_reference(view, w, eps=1e-5), dtype, "head view")


def test_rms_norm_mixed_dtypes_follow_promotion():
    """An fp32 weight over fp16 activations gives fp32, as ``w * h.to(x.dtype)`` does; Gemma keeps x's dtype."""
    x = _randn(3, 40, dtype=torch.float16 if DEVICE == "cuda" else torch.float32, seed=5)
    w = _randn(40, dtype=torch.float32, seed=6)
    assert rms_norm(x, w, eps=1e-6).dtype == torch.result_type(w, x)
    assert rms_norm(x, w, eps=1e-6, style="gemma").dtype == x.dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("group", [1, 4], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("seq", [1, 13], ids=lambda s: f"seq{s}")
@pytest.mark.parametrize("rot", [None, 16], ids=lambda r: "full" if r is None else f"rot{r}")
def test_rope_qkv_views(rot, seq, group, dtype):
    """q and k as transposed views of one fused QKV output (the runtime's layout), cos/sin broadcast over batch."""
    batch, kv_heads, dim = 2, 2, 40
    heads = kv_heads * group
    rot = dim if rot is None else rot
    qkv = _randn(batch, seq, (heads + 2 * kv_heads) * dim, dtype=dtype, seed=seq + group)
    q = qkv[..., :heads * dim].view(batch, seq, heads, dim).transpose(1, 2)
    k = qkv[..., heads * dim:(heads + kv_heads) * dim].view(batch, seq, kv_heads, dim).transpose(1, 2)
    pos = torch.arange(seq, dtype=torch.float32) + 1000
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    ang = torch.cat([pos[:, None] * inv] * 2, dim=-1)[None]
    cos, sin = ang.cos().to(DEVICE, dtype), ang.sin().to(DEVICE, dtype)
    _check(apply_rope, apply_rope_reference, (q.float(), k.float(), cos.float(), sin.float()), (q, k, cos, sin),
           dtype, f"rope rot={rot} seq={seq}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
def test_rope_per_sequence_positions(dtype):
    """cos/sin with a batch dim of their own (left-padded batches have per-sequence positions)."""
    q = _randn(3, 4, 5, 32, dtype=dtype, seed=7)
    k = _randn(3, 2, 5, 32, dtype=dtype, seed=8)
    ang = _randn(3, 5, 32, dtype=torch.float32, seed=9, scale=50.0)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    _check(apply_rope, apply_rope_reference, (q.float(), k.float(), cos.float(), sin.float()), (q, k, cos, sin),
           dtype, "per-sequence positions")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("n", [1, 37, 1500], ids=lambda n: f"n{n}")
def test_silu_mul(n, dtype):
    x = _randn(2, 3, 2 * n, dtype=dtype, seed=n, scale=4.0)
    _check(silu_mul, silu_mul_reference, (x.float(),), (x,), dtype, f"silu_mul n={n}")


def test_references_match_the_stock_modules():
    """The references are the stock formulas: LlamaRMSNorm, Gemma3RMSNorm, apply_rotary_pos_emb, LlamaMLP's act."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    x = torch.randn(2, 3, 24, dtype=torch.bfloat16)
    llama, gemma = LlamaRMSNorm(24, eps=1e-5).to(torch.bfloat16), Gemma3RMSNorm(24, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        llama.weight.normal_()
        gemma.weight.normal_()
    assert torch.equal(llama(x), rms_norm_reference(x, llama.weight, eps=1e-5))
    assert torch.equal(gemma(x), rms_norm_reference(x, gemma.weight, eps=1e-5, style="gemma"))
    q, k = torch.randn(2, 4, 3, 16, dtype=torch.bfloat16), torch.randn(2, 2, 3, 16, dtype=torch.bfloat16)
    cos, sin = torch.randn(2, 3, 16, dtype=torch.bfloat16), torch.randn(2, 3, 16, dtype=torch.bfloat16)
    for a, b in zip(apply_rotary_pos_emb(q, k, cos, sin), apply_rope_reference(q, k, cos, sin), strict=True):
        assert torch.equal(a, b)


def test_bad_shapes_are_one_line_errors():
    q, k = torch.randn(1, 4, 2, 16), torch.randn(1, 2, 3, 16)
    cos = torch.randn(1, 2, 16)
    with pytest.raises(LightTransferError, match="apply_rope"):
        apply_rope(q, k, cos, cos)
    with pytest.raises(LightTransferError, match="rot"):
        apply_rope(q, q[:, :2], torch.randn(1, 2, 15), torch.randn(1, 2, 15))
    with pytest.raises(LightTransferError, match="weight"):
        rms_norm(q, torch.ones(8), eps=1e-6)
    with pytest.raises(LightTransferError, match="even"):
        silu_mul(torch.randn(2, 7))


def test_reference_switch_forces_the_reference():
    """Under use_reference() the entry points return the reference's values (bit-equal)."""
    x = torch.randn(3, 50)
    with use_reference():
        assert torch.equal(silu_mul(x), silu_mul_reference(x))
        assert torch.equal(rms_norm(x, torch.ones(50), eps=1e-6), rms_norm_reference(x, torch.ones(50), eps=1e-6))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: DTYPE_IDS[d])
def test_llama3_8b_shapes(dtype):
    """The decode step's own shapes on the GPU: hidden 4096, 32 query / 8 KV heads of 128, intermediate 14336."""
    x = _randn(1, 1, 4096, dtype=dtype, seed=10)
    w = _randn(4096, dtype=dtype, seed=11)
    assert_within_policy(rms_norm(x, w, eps=1e-5), rms_norm_reference(x.float(), w.float(), eps=1e-5),
                         rms_norm_reference(x, w, eps=1e-5), dtype, "norm 4096")
    qkv = _randn(1, 1, 48 * 128, dtype=dtype, seed=12)
    q = qkv[..., :4096].view(1, 1, 32, 128).transpose(1, 2)
    k = qkv[..., 4096:5120].view(1, 1, 8, 128).transpose(1, 2)
    ang = _randn(1, 1, 128, dtype=torch.float32, seed=13, scale=100.0)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    _check(apply_rope, apply_rope_reference, (q.float(), k.float(), cos.float(), sin.float()), (q, k, cos, sin),
           dtype, "rope 32/8x128")
    gu = _randn(1, 1, 2 * 14336, dtype=dtype, seed=14, scale=3.0)
    _check(silu_mul, silu_mul_reference, (gu.float(),), (gu,), dtype, "silu_mul 14336")
