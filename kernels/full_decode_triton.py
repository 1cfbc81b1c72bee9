"""Triton kernel for decode attention of a full layer: one new query per sequence against a contiguous cache.

The keys are the full layer's history in index order (``[batch, kv_heads, N, head_dim]``, any strides with a
contiguous last dim, e.g. a view of the first ``N`` tokens of preallocated storage); keys before ``kv_start[b]``
are left padding. Flash-decoding: one program takes one (sequence, KV head) and one chunk of keys, and handles
all ``GROUP`` query heads of that KV head together, so each K/V tile is read from memory once per KV head. The
key axis is split over enough programs to fill the GPU, and the partial results are merged by log-sum-exp by the
merge kernel of :mod:`lighttransfer.kernels.decode_triton`. Positions are implicit (key ``j`` is visible iff
``j >= kv_start[b]``), so unlike the slot kernel nothing but K and V is read per key.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from .decode_launch import (
    FALLBACK_CONFIG,
    INTERPRETER_CONFIG,
    autotune_enabled,
    capability,
    decode_config,
    device_index,
    multiprocessors,
    tuned_launcher,
)
from .decode_triton import _streaming_decode_merge, plan_splits, plan_wave_splits

_LOG2E = 1.4426950408889634
# split granularity on CUDA: a multiple of every candidate BLOCK_N, so a tile never straddles two chunks
_CHUNK_ALIGN = 256


@triton.jit
def _attend_range(q, k_base, v_base, stride_kn, stride_vn, lo, hi, m_i, l_i, acc, offs_d, d_ok, qk_scale,
                  BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # online softmax over keys [lo, hi), base 2 (qk_scale carries log2(e))
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        k = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None],
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION)
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _pair_operands(Q, K, V, b, hk, h, row_ok, offs_d, d_ok, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb,
                   stride_vh):
    # pair (b, hk)'s query rows h as a [BLOCK_M, BLOCK_D] tile (zeros outside real heads and channels), and the
    # bases of its keys and values
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h[:, None].to(tl.int64) * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    return q, k_base, v_base


@triton.jit
def _attend_pair_keys(Q, K, V, b, hk, h, row_ok, offs_d, d_ok, stride_qb, stride_qh, stride_kb, stride_kh,
                      stride_kn, stride_vb, stride_vh, stride_vn, lo, hi, qk_scale, BLOCK_M: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # online softmax of pair (b, hk)'s query heads h over its keys [lo, hi): (m_i, l_i, acc), empty (nothing
    # loaded) where lo >= hi
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if lo < hi:
        q, k_base, v_base = _pair_operands(Q, K, V, b, hk, h, row_ok, offs_d, d_ok, stride_qb, stride_qh,
                                           stride_kb, stride_kh, stride_vb, stride_vh)
        m_i, l_i, acc = _attend_range(q, k_base, v_base, stride_kn, stride_vn, lo, hi, m_i, l_i, acc, offs_d,
                                      d_ok, qk_scale, BLOCK_N, DOT_PRECISION)
    return m_i, l_i, acc


@triton.jit
def _pair_tile(pid_bk, n_kv_heads, GROUP, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # program row pid_bk = (sequence b, KV head hk); tile row m = query head h = hk * GROUP + m (row_ok: a real
    # head), column = head-dim element (d_ok: within HEAD_DIM). Returns (b, hk, h, row_ok, offs_d, d_ok)
    b = pid_bk // n_kv_heads
    hk = pid_bk % n_kv_heads
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    return b, hk, hk * GROUP + offs_m, offs_m < GROUP, offs_d, offs_d < HEAD_DIM


@triton.jit
def _live_keys(n_keys, N_VALID, KV_START, b, HAS_N_VALID: tl.constexpr, HAS_START: tl.constexpr):
    # (keys the step sees, sequence b's first real key): n_keys clipped to the device-side live length (a static
    # cache), and its left padding
    if HAS_N_VALID:
        n_keys = tl.minimum(n_keys, tl.load(N_VALID).to(tl.int32))
    start = 0
    if HAS_START:
        start = tl.load(KV_START + b).to(tl.int32)
    return n_keys, start


@triton.jit
def _store_partial(PART_O, PART_LSE, part, m_i, l_i, acc, offs_d, row_ok, d_ok, BLOCK_D: tl.constexpr):
    # one split's partial: the normalized output [rows, BLOCK_D] fp32 and its log2-sum-exp (-inf where no key was
    # seen), at flat partial index ``part`` [rows] (the merge kernel's layout with one query per sequence)
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(PART_O + part[:, None] * BLOCK_D + offs_d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
    lse2 = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    tl.store(PART_LSE + part, lse2, mask=row_ok)


# the key count and chunk change at every decode step: specializing on them (divisible by 16 or not) would
# compile a second variant in the middle of a generation
@triton.jit(do_not_specialize=["n_keys", "chunk"])
def _full_decode_split(
    Q, K, V, KV_START, N_VALID, Out, PART_O, PART_LSE,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh,
    n_kv_heads, GROUP, n_keys, chunk, n_splits, qk_scale,
    HAS_START: tl.constexpr, HAS_N_VALID: tl.constexpr, SINGLE_SPLIT: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_bk = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bk // n_kv_heads
    hk = pid_bk % n_kv_heads

    # row m of the tile = query head hk * GROUP + m
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < GROUP
    d_ok = offs_d < HEAD_DIM
    h = hk * GROUP + offs_m
    q, k_base, v_base = _pair_operands(Q, K, V, b, hk, h, row_ok, offs_d, d_ok, stride_qb, stride_qh, stride_kb,
                                       stride_kh, stride_vb, stride_vh)

    if HAS_N_VALID:
        n_keys = tl.minimum(n_keys, tl.load(N_VALID).to(tl.int32))
    lo = pid_s * chunk
    hi = tl.minimum(lo + chunk, n_keys)
    if HAS_START:
        lo = tl.maximum(lo, tl.load(KV_START + b).to(tl.int32))

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i, l_i, acc = _attend_range(q, k_base, v_base, stride_kn, stride_vn, lo, hi, m_i, l_i, acc, offs_d, d_ok,
                                  qk_scale, BLOCK_N, DOT_PRECISION)

    if SINGLE_SPLIT:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        o_ptrs = Out + b.to(tl.int64) * stride_ob + h[:, None].to(tl.int64) * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        # partials [B, H, n_splits, BLOCK_D] fp32 and their log2-sum-exp [B, H, n_splits]
        row = b * n_kv_heads * GROUP + h
        _store_partial(PART_O, PART_LSE, row.to(tl.int64) * n_splits + pid_s, m_i, l_i, acc, offs_d, row_ok, d_ok,
                       BLOCK_D)


# --------------------------------------------------------------------------------------------------- configs
HOPPER_CONFIGS = [
    decode_config(128, 4, 3),
    decode_config(64, 4, 4),
    decode_config(128, 8, 3),
    decode_config(64, 4, 3),
    decode_config(256, 8, 2),
]
@functools.cache
def _tuned_launcher(capability: tuple[int, int], block_d: int, block_m: int, autotune: bool,
                    element_bytes: int = 2):
    return tuned_launcher(_full_decode_split, HOPPER_CONFIGS, capability, block_d, block_m, autotune,
                          element_bytes)


def full_decode_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kv_start: torch.Tensor | None,
    scale: float,
    n_valid: torch.Tensor | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Launch the kernels on validated inputs (see :func:`~lighttransfer.kernels.full_decode`); ``splits``
    overrides the number of chunks per (sequence, KV head). The launch reads no tensor on the host (no sync), so it
    can be captured in a CUDA graph."""
    plan = SplitDecodePlan.make(q, k, v, kv_start=kv_start, n_valid=n_valid, splits=splits)
    if plan.n_keys == 0:
        return plan.o.zero_()
    q, k, v, o = plan.q, plan.k, plan.v, plan.o
    args = (
        q, k, v, plan.start_arg, plan.n_valid_arg, o, plan.part_o, plan.part_lse,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1),
        plan.kv_heads, plan.group, plan.n_keys, plan.chunk, plan.n_splits, scale * _LOG2E,
    )
    plan.launch(_full_decode_split, args, _tuned_launcher, _BEST_CONFIG)
    return o


@dataclasses.dataclass
class SplitDecodePlan:
    """The host side of one split-K decode launch over a contiguous cache, shared by the kernels that run on this
    grid (:func:`full_decode_triton`, and the routed kernel of :mod:`.routed_decode_triton`): inputs with a
    contiguous last dim, the output ``[batch, heads, 1, head_dim]``, tile sizes, the split plan, the optional
    device tensors (``kv_start`` int32/int64, ``n_valid``) and the float32 partials of the merge."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    kv_heads: int
    group: int
    n_keys: int
    block_d: int
    block_m: int
    chunk: int = 0
    n_splits: int = 1
    start: torch.Tensor | None = None
    n_valid: torch.Tensor | None = None
    part_o: torch.Tensor | None = None
    part_lse: torch.Tensor | None = None
    device_index: int | None = None

    @classmethod
    def make(cls, q, k, v, *, kv_start, n_valid, splits) -> SplitDecodePlan:
        """The plan for ``q [batch, heads, 1, head_dim]`` over ``k, v [batch, kv_heads, N, head_dim]``; with ``N``
        = 0 only ``o`` is set (the caller returns zeros). On CUDA the split count fills the GPU's last wave
        (one program per SM at a time: the K/V tiles take most of its shared memory)."""
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        batch, heads, _, dim = q.shape
        kv_heads, n_keys = k.shape[1], k.shape[2]
        o = torch.empty((batch, heads, 1, dim), dtype=q.dtype, device=q.device)
        plan = cls(q=q, k=k, v=v, o=o, kv_heads=kv_heads, group=heads // kv_heads, n_keys=n_keys,
                   block_d=max(16, triton.next_power_of_2(dim)),
                   block_m=max(16, triton.next_power_of_2(heads // kv_heads)))
        if n_keys == 0:
            return plan
        if q.is_cuda:
            plan.device_index = device_index(q)
            plan.chunk, plan.n_splits = plan_wave_splits(batch, kv_heads, n_keys, multiprocessors(plan.device_index),
                                                         align=_CHUNK_ALIGN, splits=splits)
        else:
            plan.chunk, plan.n_splits = plan_splits(batch, kv_heads, n_keys, 1,
                                                    align=INTERPRETER_CONFIG.kwargs["BLOCK_N"], splits=splits)
        if kv_start is not None:
            start = kv_start.to(q.device)
            plan.start = (start if start.dtype in (torch.int32, torch.int64) else start.long()).contiguous()
        if n_valid is not None:
            plan.n_valid = n_valid.to(q.device)
        if plan.single:
            plan.part_o = plan.part_lse = o
        else:
            plan.part_o = torch.empty((batch, heads, 1, plan.n_splits, plan.block_d), dtype=torch.float32,
                                      device=q.device)
            plan.part_lse = torch.empty((batch, heads, 1, plan.n_splits), dtype=torch.float32, device=q.device)
        return plan

    @property
    def single(self) -> bool:
        return self.n_splits == 1

    @property
    def start_arg(self) -> torch.Tensor:
        return self.start if self.start is not None else self.o  # a placeholder pointer, never read

    @property
    def n_valid_arg(self) -> torch.Tensor:
        return self.n_valid if self.n_valid is not None else self.o

    def launch(self, split_kernel, args: tuple, tuned: Callable, best_configs: dict[tuple, dict]) -> None:
        """Run ``split_kernel`` on the grid ``(batch * kv_heads, n_splits)`` with ``args`` and the shared flags,
        then the merge of the partials. On CUDA the config is the autotuned one (``tuned(capability, block_d,
        block_m, autotune, element_bytes)`` builds the tuner); once known, ``best_configs`` keeps it and the kernel
        is launched directly (the autotuner's dispatch costs ~15 us of host time per call, measured on an H200,
        and decode at small batch is host-bound)."""
        q, o = self.q, self.o
        batch, heads, _, dim = q.shape
        flags = dict(HAS_START=self.start is not None, HAS_N_VALID=self.n_valid is not None,
                     SINGLE_SPLIT=self.single, HEAD_DIM=dim, BLOCK_D=self.block_d, BLOCK_M=self.block_m,
                     DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
        grid = (batch * self.kv_heads, self.n_splits)

        def run(kernel, extra: dict) -> None:
            kernel[grid](*args, **flags, **extra)
            if not self.single:
                _streaming_decode_merge[(batch * heads,)](
                    self.part_o, self.part_lse, o, heads, 1, self.n_splits, o.stride(0), o.stride(1), o.stride(2),
                    HEAD_DIM=dim, BLOCK_D=self.block_d, BLOCK_S=max(2, triton.next_power_of_2(self.n_splits)),
                )

        if not q.is_cuda:
            run(split_kernel, INTERPRETER_CONFIG.kwargs)
            return
        cap = capability(self.device_index)
        key = (cap, self.block_d, self.block_m, self.single, q.dtype, self.n_valid is not None, autotune_enabled())
        best = best_configs.get(key)
        kernel, extra = (split_kernel, best) if best is not None else \
            (tuned(cap, self.block_d, self.block_m, key[-1], q.element_size()), {})
        if self.device_index == torch.cuda.current_device():
            run(kernel, extra)
        else:
            with torch.cuda.device(self.device_index):
                run(kernel, extra)
        if best is None:
            config = getattr(kernel, "best_config", None)
            if config is not None and hasattr(config, "all_kwargs"):
                best_configs[key] = config.all_kwargs()


# (capability, BLOCK_D, BLOCK_M, single split, dtype, device length, autotune) -> the tuned config's options
_BEST_CONFIG: dict[tuple, dict] = {}


__all__ = ["full_decode_triton", "SplitDecodePlan", "HOPPER_CONFIGS", "FALLBACK_CONFIG"]
