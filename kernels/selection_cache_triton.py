"""The Triton kernel of :func:`lighttransfer.kernels.selection_cache.selection_lookup`: one program per sequence
reads its query (every head, in its own dtype and strides) and its float32 anchor twice at most (the cosine, then
the copy on a miss, or at every lookup when comparing with the previous query), decides the hit, moves the anchor and its key index where it missed, and counts."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode_launch import launch_device


@triton.jit(do_not_specialize=["pos_const", "max_age"])
def _lookup(
    Q, ANCHOR, ANCHOR_POS, POS, HIT, COUNTER,
    stride_qb, stride_qh, stride_qd, width, pos_const, reuse, max_age, eps,
    HEAD_DIM: tl.constexpr, POS_ON_DEVICE: tl.constexpr, FORCE: tl.constexpr, COUNT: tl.constexpr,
    PREVIOUS: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    q_row = Q + b.to(tl.int64) * stride_qb
    a_row = ANCHOR + b.to(tl.int64) * width
    made = tl.load(ANCHOR_POS + b)
    p = pos_const + tl.zeros([], dtype=tl.int64)  # the query's key index: pos, or n_valid - 1 on the device
    if POS_ON_DEVICE:
        p += tl.load(POS).to(tl.int64)
    young = p - made <= max_age
    if FORCE == 0:  # the cosine threshold decides
        dot = tl.zeros([BLOCK], dtype=tl.float32)
        qq = tl.zeros([BLOCK], dtype=tl.float32)
        aa = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, width, BLOCK):
            e = start + tl.arange(0, BLOCK)
            m = e < width
            x = tl.load(q_row + (e // HEAD_DIM) * stride_qh + (e % HEAD_DIM) * stride_qd, mask=m, other=0.0)
            x = x.to(tl.float32)
            a = tl.load(a_row + e, mask=m, other=0.0)
            dot += x * a
            qq += x * x
            aa += a * a
        norms = tl.maximum(tl.sqrt(tl.sum(qq, 0)), eps) * tl.maximum(tl.sqrt(tl.sum(aa, 0)), eps)
        similar = tl.sum(dot, 0) / norms >= reuse
    else:  # forced: 1 = every query similar, 2 = none
        similar = (tl.zeros([], dtype=tl.int32) + FORCE) == 1
    hit = similar & young
    tl.store(HIT + b, hit.to(tl.int8))
    if PREVIOUS:  # this query becomes the one the next lookup compares with: always, or on a miss
        rewrite = tl.full([], 1, tl.int1)
    else:
        rewrite = hit == 0
    if rewrite:
        for start in range(0, width, BLOCK):
            e = start + tl.arange(0, BLOCK)
            m = e < width
            x = tl.load(q_row + (e // HEAD_DIM) * stride_qh + (e % HEAD_DIM) * stride_qd, mask=m, other=0.0)
            tl.store(a_row + e, x.to(tl.float32), mask=m)
    if not hit:  # a new selection, made here
        tl.store(ANCHOR_POS + b, p)
    if COUNT:
        tl.atomic_add(COUNTER, tl.full([], 1, tl.int64))
        tl.atomic_add(COUNTER + 1, hit.to(tl.int64))


def selection_lookup_triton(q: torch.Tensor, anchor: torch.Tensor, anchor_pos: torch.Tensor, pos: int | None, *,
                            reuse: float, max_age: int, force: bool | None, counter: torch.Tensor | None, eps: float,
                            n_valid: torch.Tensor | None = None, previous: bool = False) -> torch.Tensor:
    """Launch :func:`_lookup` on validated inputs; returns ``hit [B]`` bool (a view of the kernel's int8 flags)."""
    batch, heads, _, dim = q.shape
    hit = torch.empty(batch, dtype=torch.int8, device=q.device)
    if batch == 0:
        return hit.bool()
    on_device = n_valid is not None
    pos_arg = n_valid.to(device=q.device).reshape(-1) if on_device else anchor_pos
    width = heads * dim
    block = min(1024, triton.next_power_of_2(width)) if q.is_cuda else min(64, triton.next_power_of_2(width))
    force_code = 0 if force is None else (1 if force else 2)
    with launch_device(q):
        _lookup[(batch,)](
            q, anchor, anchor_pos, pos_arg, hit, counter if counter is not None else anchor_pos,
            q.stride(0), q.stride(1), q.stride(3), width, -1 if on_device else int(pos), float(reuse), int(max_age),
            float(eps), HEAD_DIM=dim, POS_ON_DEVICE=on_device, FORCE=force_code, COUNT=counter is not None,
            PREVIOUS=bool(previous), BLOCK=block)
    return hit.view(torch.bool)


__all__ = ["selection_lookup_triton"]
