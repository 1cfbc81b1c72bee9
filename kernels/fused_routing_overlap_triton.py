"""The fused QAdA decode step with the decision overlapped with the bulk (:func:`~lighttransfer.kernels.
fused_routed_decode`, ``variant="overlap"``): one launch for the local keys, the decision and the bulk, and a merge.

The three-launch path (:mod:`.fused_routing_triton`) runs the bulk only after every pair has decided: pass 1's
programs, its tail (the last program's moments update and ``f̂``) and the launch between the passes lie on the
step's critical path. Measured on an H200 at batch 1 (8B shape, 32k keys) that cost a fixed ~28 us, as much as
the dense attention itself. Here the bulk does not wait:

- Grid ``(batch * kv_heads, n_local + n_bulk)``. Programs ``c < n_local`` of a pair are pass 1's programs
  (:func:`~.fused_routing_triton._local_chunk_decide`): their chunk of the local set, then, in the pair's last
  one, the decision, published as the routing flag and as the pair's *state word* (0 undecided, 1 local, 2 full;
  an atomic exchange with release order).
- Programs ``c >= n_local`` attend chunk ``c - n_local`` of the bulk *speculatively*: they start at once, and
  read the state word before every ``poll`` keys; once it says local they stop reading. Programs with lower ids
  are dispatched first, so the deciding programs run in the first wave and most of a local pair's bulk is never
  read; but nothing waits for anything, so no schedule can deadlock, and any interleaving gives the same output.
- The merge (:func:`_overlap_merge`, its own launch, so every program has finished) reads the routing flag: a
  local pair's output merges only its local slots (whatever its bulk programs wrote is ignored), a full pair's
  merges every slot (its bulk programs never saw "local", so each attended its whole chunk). The merge of each
  pair's first query head sets the state word back to 0 for the next launch (a CUDA graph replays both).

Outputs, flags, moments and counts are those of the three-launch path (the local programs are its pass 1); only
what a local pair's bulk programs read before the decision lands differs, and it is discarded. The cost: with
every pair full the step reads what dense attention reads, plus the moments; with every pair local it reads the
local set, the moments and the bulk chunks started before the decision (about the first wave's, see
``docs/head_routing.md``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .decode_launch import INTERPRETER_CONFIG, capability, device_index, multiprocessors
from .decode_triton import _merge_partials, plan_splits, plan_wave_splits
from .full_decode_triton import (
    _CHUNK_ALIGN,
    _attend_range,
    _live_keys,
    _pair_operands,
    _pair_tile,
    _store_partial,
)
from .fused_routing_one_triton import one_launch_config
from .fused_routing_triton import _LOCAL_ALIGN, _LOG2E, _local_chunk_decide, fold_buffer, fold_rows

# keys a bulk program attends between two reads of its pair's state word (a multiple of every BLOCK_N): small
# enough that a local pair's programs stop soon after the decision, large enough that the software-pipelined key
# loop between two reads runs at full speed
POLL_KEYS = 512
# keys per local chunk: the decision lands after about this many keys of attention (and its moments update)
LOCAL_CHUNK = 256


@triton.jit(do_not_specialize=["n_keys", "local_chunk", "chunk"])
def _overlap_step(
    Q, K, V, KV_START, N_VALID, PART_O, PART_LSE,
    COUNT, FIRST, SECOND, LOCAL, PAIR_TICKET, SEQ_TICKET, STATS, STATE, QUAD,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    n_kv_heads, GROUP, n_keys, local_chunk, n_local, chunk, n_bulk, poll, sink, window, qk_scale, scale, tau,
    HAS_START: tl.constexpr, HAS_N_VALID: tl.constexpr, HAS_STATS: tl.constexpr, DIAGONAL: tl.constexpr,
    LOCAL_LAST: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_bk = tl.program_id(0)
    pid = tl.program_id(1)
    n_slots = n_local + n_bulk
    # LOCAL_LAST (tests under the interpreter, which runs programs in order): the bulk programs first, so that
    # they run before the decision; the slots of the partials stay local first either way
    slot = tl.where(pid < n_bulk, pid + n_local, pid - n_bulk) if LOCAL_LAST else pid
    if slot < n_local:
        _local_chunk_decide(Q, K, V, KV_START, N_VALID, PART_O, PART_LSE, COUNT, FIRST, SECOND, LOCAL, PAIR_TICKET,
                            SEQ_TICKET, STATS, STATE, QUAD, stride_qb, stride_qh, stride_kb, stride_kh, stride_kn,
                            stride_vb, stride_vh, stride_vn, pid_bk, slot, n_kv_heads, GROUP, n_keys, local_chunk,
                            n_local, n_slots, sink, window, qk_scale, scale, tau, HAS_START, HAS_N_VALID,
                            HAS_STATS, True, DIAGONAL, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, BLOCK_C, BLOCK_R,
                            DOT_PRECISION)
    else:
        s = slot - n_local
        b, hk, h, row_ok, offs_d, d_ok = _pair_tile(pid_bk, n_kv_heads, GROUP, HEAD_DIM, BLOCK_M, BLOCK_D)
        n_keys, start = _live_keys(n_keys, N_VALID, KV_START, b, HAS_N_VALID, HAS_START)
        lo = tl.maximum(s * chunk, start + sink)
        hi = tl.minimum(s * chunk + chunk, n_keys - window)
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        q, k_base, v_base = _pair_operands(Q, K, V, b, hk, h, row_ok, offs_d, d_ok, stride_qb, stride_qh, stride_kb,
                                           stride_kh, stride_vb, stride_vh)
        state = tl.load(STATE + pid_bk, volatile=True)
        for seg in tl.range(lo, hi, poll, num_stages=1):
            if state != 1:
                m_i, l_i, acc = _attend_range(q, k_base, v_base, stride_kn, stride_vn, seg,
                                              tl.minimum(seg + poll, hi), m_i, l_i, acc, offs_d, d_ok, qk_scale,
                                              BLOCK_N, DOT_PRECISION)
                if state == 0:
                    state = tl.load(STATE + pid_bk, volatile=True)
        row = b * n_kv_heads * GROUP + h
        _store_partial(PART_O, PART_LSE, row.to(tl.int64) * n_slots + slot, m_i, l_i, acc, offs_d, row_ok, d_ok,
                       BLOCK_D)


@triton.jit
def _overlap_merge(PART_O, PART_LSE, LOCAL, STATE, Out, H, GROUP, n_local, n_slots, stride_ob, stride_oh,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)  # flat (b, h)
    h = row % H
    b = row // H
    pair = b * (H // GROUP) + h // GROUP
    local = tl.load(LOCAL + pair) != 0
    out = _merge_partials(PART_O, PART_LSE, row, n_slots, tl.where(local, n_local, n_slots), BLOCK_D, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(Out + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty),
             mask=offs_d < HEAD_DIM)
    if h % GROUP == 0:
        tl.store(STATE + pair, 0)


def plan_overlap(batch: int, kv_heads: int, n_keys: int, local_keys: int, *, cuda_sms: int | None,
                 splits: int | None = None, local_splits: int | None = None) -> tuple[int, int, int, int]:
    """``(local_chunk, n_local, chunk, n_bulk)``: the local set in chunks of about :data:`LOCAL_CHUNK` keys (the
    decision's latency), the key axis as dense attention splits it (:func:`~.decode_triton.plan_wave_splits`):
    with every pair full the step then does dense attention's work on dense attention's grid, plus the local
    programs. ``cuda_sms`` ``None``: the interpreter (one split each, unless given)."""
    if cuda_sms is None:
        align = INTERPRETER_CONFIG.kwargs["BLOCK_N"]
        local_chunk, n_local = plan_splits(batch, kv_heads, local_keys, 1, align=align, splits=local_splits)
        chunk, n_bulk = plan_splits(batch, kv_heads, n_keys, 1, align=align, splits=splits)
        return local_chunk, n_local, chunk, n_bulk
    if local_splits is None:
        local_splits = triton.cdiv(local_keys, LOCAL_CHUNK)
    local_chunk, n_local = plan_splits(batch, kv_heads, local_keys, 0, align=_LOCAL_ALIGN, splits=local_splits)
    chunk, n_bulk = plan_wave_splits(batch, kv_heads, n_keys, cuda_sms, align=_CHUNK_ALIGN, splits=splits)
    return local_chunk, n_local, chunk, n_bulk


@functools.cache
def _config_kwargs(cap: tuple[int, int], block_d: int, block_m: int, element_bytes: int) -> dict:
    # pinned (the kernel has side effects: an autotuner must never replay it): the one-launch kernel's rule
    return one_launch_config(cap, block_d, block_m, element_bytes).all_kwargs()


def fused_overlap_triton(q, k, v, moments, *, tau: float, sink: int, window: int, kv_start, scale: float,
                         n_valid, counts, workspace, splits=None, local_splits=None, poll: int | None = None,
                         local_last: bool = False):
    """Launch ``_overlap_step`` and its merge on validated inputs (see
    :func:`~lighttransfer.kernels.fused_routed_decode`); returns ``(o, flags int8 [batch, kv_heads])``. Reads no
    tensor on the host; the workspace is zero again after the merge. ``poll``: keys between two reads of the
    state word (default :data:`POLL_KEYS`, rounded up to whole tiles: 256 keys on a GPU, at least one);
    ``local_last``: the bulk programs take the lower program ids (tests: under the interpreter they then all run
    before the decision)."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    batch, heads, _, dim = q.shape
    kv_heads, n_keys = k.shape[1], k.shape[2]
    group = heads // kv_heads
    block_d = max(16, triton.next_power_of_2(dim))
    block_m = max(16, triton.next_power_of_2(group))
    index = device_index(q) if q.is_cuda else None
    local_chunk, n_local, chunk, n_bulk = plan_overlap(
        batch, kv_heads, n_keys, sink + window, cuda_sms=multiprocessors(index) if q.is_cuda else None,
        splits=splits, local_splits=local_splits)
    # a whole number of key tiles, at least one (a step of 0 would never end the loop)
    align = _CHUNK_ALIGN if q.is_cuda else INTERPRETER_CONFIG.kwargs["BLOCK_N"]
    poll = align * max(1, triton.cdiv(POLL_KEYS if poll is None else int(poll), align))
    n_slots = n_local + n_bulk
    quad = fold_buffer(batch * kv_heads, n_local, block_m, moments.diagonal, q.device)
    o = torch.empty((batch, heads, 1, dim), dtype=q.dtype, device=q.device)
    part_o = torch.empty((batch, heads, 1, n_slots, block_d), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((batch, heads, 1, n_slots), dtype=torch.float32, device=q.device)
    flags = torch.empty((batch, kv_heads), dtype=torch.int8, device=q.device)
    start = None
    if kv_start is not None:
        start = kv_start.to(q.device)
        start = (start if start.dtype in (torch.int32, torch.int64) else start.long()).contiguous()
    nv = n_valid.to(q.device) if n_valid is not None else None
    args = (q, k, v, start if start is not None else o, nv if nv is not None else o, part_o, part_lse,
            moments.count, moments.first, moments.second, flags, workspace.pair, workspace.sequence,
            counts if counts is not None else part_lse, workspace.state, quad,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            kv_heads, group, n_keys, local_chunk, n_local, chunk, n_bulk, poll, sink, window, scale * _LOG2E, scale,
            float(tau))
    flags_kw = dict(HAS_START=start is not None, HAS_N_VALID=nv is not None, HAS_STATS=counts is not None,
                    DIAGONAL=moments.diagonal, LOCAL_LAST=bool(local_last), HEAD_DIM=dim, BLOCK_D=block_d,
                    BLOCK_M=block_m, BLOCK_C=max(2, triton.next_power_of_2(n_local)), BLOCK_R=fold_rows(block_d),
                    DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")

    def run(config: dict) -> None:
        _overlap_step[(batch * kv_heads, n_slots)](*args, **flags_kw, **config)
        _overlap_merge[(batch * heads,)](part_o, part_lse, flags, workspace.state, o, heads, group, n_local, n_slots,
                                         o.stride(0), o.stride(1), HEAD_DIM=dim, BLOCK_D=block_d,
                                         BLOCK_S=max(2, triton.next_power_of_2(n_slots)))

    if not q.is_cuda:
        run(INTERPRETER_CONFIG.kwargs)
        return o, flags
    config = _config_kwargs(capability(index), block_d, block_m, q.element_size())
    if index == torch.cuda.current_device():
        run(config)
    else:
        with torch.cuda.device(index):
            run(config)
    return o, flags


__all__ = ["fused_overlap_triton", "plan_overlap", "POLL_KEYS", "LOCAL_CHUNK"]
