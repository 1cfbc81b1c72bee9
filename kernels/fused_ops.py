"""Fused element-wise ops of a decoder layer (RMSNorm, rotary embedding of q and k, SiLU-and-multiply), each beside
the plain PyTorch reference it must reproduce, dispatched like the attention kernels (:mod:`.switch`).

The references are the stock transformers formulas, written once here:

* RMSNorm, Llama style (Llama, Mistral, Qwen2, Qwen3 and their q/k norms): ``w * (x.float() * rsqrt(mean(x.float()^2)
  + eps)).to(x.dtype)``, in the dtype ``w * x`` promotes to;
* RMSNorm, Gemma style (Gemma 3): ``((x.float() * rsqrt(mean(x.float()^2) + eps)) * (1 + w.float())).to(x.dtype)``;
* rotary embedding, rotate-half convention (``apply_rotary_pos_emb``): ``x * cos + rotate_half(x) * sin`` over the
  first ``rot = cos.shape[-1]`` channels, the rest passed through (partial rotary, GPT-NeoX's ``rotary_pct``);
* ``silu(gate) * up`` over a fused ``[gate | up]`` projection.

At batch 1 a decode step is a few large GEMMs and hundreds of such small chains; in a CUDA graph each tiny eager
kernel still costs ~2-4 us of GPU time, so one launch per chain is what these kernels buy (see ``NOTES.md``).
"""

from __future__ import annotations

import torch

from ..errors import LightTransferError
from .attention import SUPPORTED_DTYPES
from .switch import triton_runs_on

NORM_STYLES = ("llama", "gemma")


# ---- references ----------------------------------------------------------------------------------------------
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, *, eps: float, style: str = "llama") -> torch.Tensor:
    """RMSNorm over the last dim of ``x [..., n]`` with ``weight [n]``, exactly as the stock module of ``style``."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if style == "gemma":
        return (h * (1.0 + weight.float())).type_as(x)
    return weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE of ``q [batch, heads, seq, head_dim]`` and ``k [batch, kv_heads, seq, head_dim]`` by
    ``cos, sin [batch or 1, seq, rot]`` (``rot <= head_dim``; the channels from ``rot`` on pass through)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot = cos.shape[-1]

    def one(x):
        if rot == x.shape[-1]:
            return (x * cos) + (rotate_half(x) * sin)
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        return torch.cat(((x_rot * cos) + (rotate_half(x_rot) * sin), x_pass), dim=-1)

    return one(q), one(k)


def silu_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``x [..., 2 * n] = [gate | up]`` -> ``[..., n]``."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


# ---- entry points --------------------------------------------------------------------------------------------
def _check_dtype(name: str, x: torch.Tensor) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise LightTransferError(f"{name}: dtype {x.dtype} is not supported by the Triton kernel (use float16, "
                                 "bfloat16 or float32, or force the reference with use_reference()).")


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _warps(block: int) -> int:
    return 1 if block <= 256 else 4 if block <= 2048 else 8


def rms_norm(x: torch.Tensor, weight: torch.Tensor, *, eps: float, style: str = "llama") -> torch.Tensor:
    """RMSNorm over the last dim, one launch.

    Args:
        x: ``[..., n]``, last dim contiguous; the leading dims may be a view (e.g. ``[batch, seq, heads, head_dim]``
            split out of a fused projection), as long as all but the last leading dim collapse into one.
        weight: ``[n]``.
        eps: the module's epsilon; style: ``llama`` or ``gemma`` (see the module docstring).

    Returns:
        A fresh contiguous ``[..., n]`` tensor in the stock module's output dtype.
    """
    if style not in NORM_STYLES:
        raise LightTransferError(f"rms_norm: style must be one of {NORM_STYLES}, got {style!r}.")
    n = x.shape[-1]
    if weight.shape != (n,):
        raise LightTransferError(f"rms_norm: weight must be [{n}], got {tuple(weight.shape)}.")
    if not triton_runs_on(x):
        return rms_norm_reference(x, weight, eps=eps, style=style)
    _check_dtype("rms_norm", x)
    out_dtype = x.dtype if style == "gemma" else torch.result_type(weight, x)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if x.numel() == 0:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    xs = x.reshape(1, 1, n) if x.dim() == 1 else _rows(x)
    os = out.view(xs.shape)
    weight = weight.contiguous()
    from .fused_ops_triton import MAX_NORM_BLOCK, NORM_TILE, _rms_norm

    block = min(_pow2(n), MAX_NORM_BLOCK)
    n_rows = xs.shape[0] * xs.shape[1]
    rows = min(max(NORM_TILE // block, 1), _pow2(n_rows))
    _rms_norm[(_cdiv(n_rows, rows),)](
        xs, weight, os, xs.stride(0), xs.stride(1), os.stride(0), os.stride(1), n_rows, xs.shape[1], n, float(eps),
        GEMMA=style == "gemma", ROWS=rows, BLOCK=block, CHUNKS=_cdiv(n, block), num_warps=_warps(rows * block))
    return out


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x [..., m, n]`` as ``[rows, m, n]`` without a copy where the leading dims collapse, else contiguous."""
    try:
        return x.view(-1, x.shape[-2], x.shape[-1])
    except RuntimeError:
        return x.contiguous().view(-1, x.shape[-2], x.shape[-1])


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE of q and k in one launch (as transformers' ``apply_rotary_pos_emb``, ``unsqueeze_dim=1``).

    Args:
        q: ``[batch, heads, seq, head_dim]``; k: ``[batch, kv_heads, seq, head_dim]``; any strides with a contiguous
            last dim (e.g. transposed views of a fused QKV projection).
        cos, sin: ``[batch or 1, seq, rot]``, ``rot`` even and at most ``head_dim`` (partial rotary below it).

    Returns:
        ``(q_embed, k_embed)``, fresh tensors of q's and k's shapes, strides and dtype.
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise LightTransferError(f"apply_rope: q [batch, heads, seq, head_dim] and k [batch, kv_heads, seq, "
                                 f"head_dim] must agree, got q {tuple(q.shape)}, k {tuple(k.shape)}.")
    batch, heads, seq, dim = q.shape
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[0] not in (1, batch) or cos.shape[1] != seq \
            or cos.shape[2] > dim or cos.shape[2] % 2:
        raise LightTransferError(f"apply_rope: cos and sin must be [batch or 1, seq, rot] = [{batch}, {seq}, "
                                 f"<= {dim}, even], got {tuple(cos.shape)} and {tuple(sin.shape)}.")
    if not triton_runs_on(q):
        return apply_rope_reference(q, k, cos, sin)
    _check_dtype("apply_rope", q)
    if q.dtype != k.dtype:
        raise LightTransferError(f"apply_rope: q and k must share a dtype, got {q.dtype} and {k.dtype}.")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    # the eager chain's result dtype: cos/sin are usually in the model's dtype already
    out_dtype = torch.result_type(q, cos)
    q_out = torch.empty_like(q, dtype=out_dtype)
    k_out = torch.empty_like(k, dtype=out_dtype)
    if q.numel() == 0:
        return q_out, k_out
    if q_out.stride(-1) != 1 or k_out.stride(-1) != 1:
        q_out, k_out = q_out.contiguous(), k_out.contiguous()
    rot = cos.shape[-1]
    cos, sin = cos.expand(batch, seq, rot), sin.expand(batch, seq, rot)
    if cos.stride(-1) != 1 or cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    from .fused_ops_triton import _rope_qk

    block_h = _pow2(max(rot // 2, 1))
    block_d = _pow2(max(dim - rot, 1))
    block_q, block_k = _pow2(heads), _pow2(k.shape[1])
    _rope_qk[(batch * seq, 2)](
        q, k, cos, sin, q_out, k_out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos.stride(0), cos.stride(1), seq, heads, k.shape[1],
        HALF=rot // 2, ROT=rot, HEAD_DIM=dim, BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=_warps(block_q * block_h))
    return q_out, k_out


SILU_BLOCK = 1024


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a fused projection ``x [..., 2 * n] = [gate | up]`` -> fresh ``[..., n]``, one launch."""
    if x.shape[-1] % 2:
        raise LightTransferError(f"silu_mul: the last dim holds [gate | up] and must be even, got {x.shape[-1]}.")
    if not triton_runs_on(x):
        return silu_mul_reference(x)
    _check_dtype("silu_mul", x)
    n = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    xs = x.reshape(-1, 2 * n)
    if xs.stride(-1) != 1:
        xs = xs.contiguous()
    os = out.view(-1, n)
    from .fused_ops_triton import _silu_mul

    total = xs.shape[0] * n
    block = min(SILU_BLOCK, _pow2(total))
    _silu_mul[(_cdiv(total, block),)](xs, os, xs.stride(0), os.stride(0), xs.shape[0], n, BLOCK=block,
                                      num_warps=_warps(block))
    return out


__all__ = ["rms_norm", "rms_norm_reference", "apply_rope", "apply_rope_reference", "silu_mul", "silu_mul_reference",
           "rotate_half", "NORM_STYLES"]
