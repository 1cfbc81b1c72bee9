"""Shared helpers for the kernel tests: devices, dtypes and the relative-error policy."""

from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter computes in fp32 on the CPU; half precision runs only where the kernels compile for a GPU
DTYPES = [torch.float16, torch.bfloat16, torch.float32] if DEVICE == "cuda" else [torch.float32]
DTYPE_IDS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def floor_for(dtype: torch.dtype) -> float:
    """Absolute slack on top of the 2x rule: a couple of rounding steps of ``dtype`` at unit magnitude."""
    return 2e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps


def assert_within_policy(out: torch.Tensor, ref: torch.Tensor, ref_low: torch.Tensor, dtype: torch.dtype,
                         what: str) -> None:
    """``|out - ref|`` at most twice ``|ref_low - ref|`` plus a small floor; infinities must coincide exactly.

    ``ref`` is the float32 reference, ``ref_low`` the same reference computed in ``dtype``.
    """
    out, ref, ref_low = out.float(), ref.float(), ref_low.float()
    assert not torch.isnan(out).any(), f"{what}: nan in kernel output"
    inf_out, inf_ref = torch.isinf(out), torch.isinf(ref)
    assert torch.equal(inf_out, inf_ref), f"{what}: -inf pattern differs from the reference"
    if inf_out.all():
        return
    finite = ~inf_ref
    err = (out - ref)[finite].abs().max().item()
    base = (ref_low - ref)[finite].abs().max().item()
    limit = 2 * base + floor_for(dtype)
    assert err <= limit, f"{what}: max error {err:.3g} > {limit:.3g} (low-precision reference error {base:.3g})"
