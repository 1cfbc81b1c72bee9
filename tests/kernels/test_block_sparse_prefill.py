"""Block-sparse prefill kernel vs its fp32 reference (lists from kernels/block_lists.py), over awkward shapes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from kernel_error_policy import DEVICE, DTYPE_IDS, DTYPES, assert_within_policy
from lighttransfer.errors import LightTransferError
from lighttransfer.kernels.block_lists import (
    always_kept,
    block_list_mask,
    dense_lists,
    keep_mask,
    lists_from_keep,
)
from lighttransfer.kernels.reference import masked_attention
from lighttransfer.kernels.sparse_prefill import block_sparse_attention, block_sparse_attention_reference


@dataclass(frozen=True)
class Case:
    id: str
    n_kv: int
    n: int | None = None  # queries; default all keys (q_offset = n_kv - n)
    block_q: int = 16
    block_k: int = 16
    heads: int = 4
    kv_heads: int = 2
    list_heads: str = "q"  # one list per query head ("q") or per KV head ("kv")
    dim: int = 32
    batch: int = 1
    keep_share: float = 0.5
    sink_blocks: int = 1
    local_blocks: int = 1
    kv_start: tuple[int, ...] | None = None


CASES = [
    Case("N=1", n_kv=1, heads=2, kv_heads=1, dim=16),
    Case("N=16-one-block", n_kv=16),
    Case("ragged-N=53", n_kv=53),
    Case("gqa4-N=101", n_kv=101, heads=8, kv_heads=2),
    Case("gqa1-D64", n_kv=67, heads=2, kv_heads=2, dim=64),
    Case("kv-head-lists-gqa2", n_kv=90, heads=4, kv_heads=2, list_heads="kv"),
    Case("bq32-bk16", n_kv=97, block_q=32, block_k=16),
    Case("bq16-bk32", n_kv=97, block_q=16, block_k=32),
    Case("chunk-of-last-23", n_kv=120, n=23),
    Case("chunk-unaligned-offset", n_kv=75, n=40),
    Case("only-band-and-sink", n_kv=130, keep_share=0.0, sink_blocks=2, local_blocks=2),
    Case("no-sink", n_kv=70, sink_blocks=0),
    Case("D=40-padded", n_kv=50, dim=40),
    Case("D=128", n_kv=70, heads=2, kv_heads=1, dim=128),
    Case("padding-left", n_kv=60, batch=3, kv_start=(0, 7, 33)),
]


def _make(case: Case, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    n = case.n if case.n is not None else case.n_kv
    q = torch.randn(case.batch, case.heads, n, case.dim, generator=g)
    k = torch.randn(case.batch, case.kv_heads, case.n_kv, case.dim, generator=g)
    v = torch.randn(case.batch, case.kv_heads, case.n_kv, case.dim, generator=g)
    q, k, v = (t.to(DEVICE, dtype) for t in (q, k, v))
    q_offset = case.n_kv - n
    q_blocks = -(-n // case.block_q)
    base = always_kept(q_blocks, block_q=case.block_q, block_k=case.block_k, q_offset=q_offset, n_kv=case.n_kv,
                       n_q=n, sink_blocks=case.sink_blocks, local_blocks=case.local_blocks)
    lh = case.heads if case.list_heads == "q" else case.kv_heads
    causal = always_kept(q_blocks, block_q=case.block_q, block_k=case.block_k, q_offset=q_offset, n_kv=case.n_kv,
                         n_q=n, sink_blocks=0, local_blocks=10**6)
    extra = (torch.rand(case.batch, lh, *base.shape, generator=g) < case.keep_share) & causal
    keep = base | extra
    lists = lists_from_keep(keep.to(DEVICE), block_q=case.block_q, block_k=case.block_k, q_offset=q_offset,
                            n_kv=case.n_kv, n_q=n)
    kv_start = None if case.kv_start is None else torch.tensor(case.kv_start, dtype=torch.int32, device=DEVICE)
    return q, k, v, lists, kv_start


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernel_matches_reference(case, dtype):
    q, k, v, lists, kv_start = _make(case, dtype, seed=hash(case.id) % 1000)
    o, lse = block_sparse_attention(q, k, v, lists, kv_start=kv_start, return_lse=True)
    assert o.shape == q.shape and o.dtype == q.dtype and lse.shape == q.shape[:3]
    ref_o, ref_lse = block_sparse_attention_reference(q.float(), k.float(), v.float(), lists, kv_start=kv_start,
                                                      return_lse=True)
    low_o, low_lse = block_sparse_attention_reference(q, k, v, lists, kv_start=kv_start, return_lse=True,
                                                      compute_dtype=dtype)
    assert_within_policy(o, ref_o, low_o, dtype, f"{case.id} output")
    assert_within_policy(lse, ref_lse, low_lse, dtype, f"{case.id} lse")


@pytest.mark.parametrize("case", CASES[:8] + CASES[-1:], ids=lambda c: c.id)
def test_reference_is_the_block_mask_rule(case):
    """The gathering reference equals attention under the dense element mask built from the same lists."""
    q, k, v, lists, kv_start = _make(case, torch.float32, seed=3)
    visible = block_list_mask(lists, q.shape[1], q.shape[2], kv_start=kv_start)
    want_o, want_lse = masked_attention(q, k, v, visible, 1 / math.sqrt(q.shape[-1]))
    got_o, got_lse = block_sparse_attention_reference(q, k, v, lists, kv_start=kv_start, return_lse=True)
    torch.testing.assert_close(got_o, want_o, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isinf(got_lse), torch.isinf(want_lse))


@pytest.mark.parametrize("n_kv, n, bq, bk", [(77, 77, 16, 16), (96, 40, 32, 16), (50, 50, 16, 32)],
                         ids=["full", "chunk", "bk>bq"])
def test_all_blocks_kept_equals_dense_causal(n_kv, n, bq, bk):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, n, 16, generator=g).to(DEVICE)
    k, v = (torch.randn(1, 2, n_kv, 16, generator=g).to(DEVICE) for _ in range(2))
    lists = dense_lists(1, 4, n, n_kv, block_q=bq, block_k=bk, q_offset=n_kv - n, device=DEVICE)
    assert lists.density() == 1.0
    mask = torch.arange(n_kv).view(1, -1) <= torch.arange(n).view(-1, 1) + (n_kv - n)
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                              attn_mask=mask.to(DEVICE))
    torch.testing.assert_close(block_sparse_attention(q, k, v, lists), expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(block_sparse_attention_reference(q, k, v, lists), expected, atol=2e-5, rtol=1e-4)


def test_always_kept_holds_sink_band_and_diagonal():
    keep = always_kept(6, block_q=32, block_k=16, q_offset=0, n_kv=190, n_q=190, sink_blocks=1, local_blocks=2)
    for qb in range(6):
        kept = set(torch.nonzero(keep[qb]).flatten().tolist())
        diag = min((qb * 32 + 31), 189) // 16
        assert {0, diag, diag - 1, qb * 2} <= kept  # sink, diagonal, band, the block's first rows
        assert max(kept) == diag  # nothing past the diagonal


@pytest.mark.parametrize("n_kv, n, bq, bk", [(77, 77, 16, 16), (96, 40, 32, 16), (50, 50, 16, 32)])
def test_block_pairs_count_the_causal_pairs(n_kv, n, bq, bk):
    from lighttransfer.kernels.block_lists import block_pairs, visited_pairs

    pairs = block_pairs(-(-n // bq), block_q=bq, block_k=bk, q_offset=n_kv - n, n_kv=n_kv, n_q=n)
    mask = torch.arange(n_kv).view(1, -1) <= torch.arange(n).view(-1, 1) + (n_kv - n)
    assert pairs.sum().item() == mask.sum().item()
    lists = dense_lists(2, 3, n, n_kv, block_q=bq, block_k=bk, q_offset=n_kv - n)
    assert visited_pairs(lists) == 6 * mask.sum().item()
    assert pairs[0, 0].item() == mask[:bq, :bk].sum().item()


def test_lists_round_trip_through_keep_mask():
    keep = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(1)) < 0.4
    keep[..., 0] = True
    lists = lists_from_keep(keep, block_q=16, block_k=16, q_offset=0, n_kv=112, n_q=80)
    assert torch.equal(keep_mask(lists), keep)
    valid = torch.arange(lists.indices.shape[-1]) < lists.counts.unsqueeze(-1)
    assert (lists.indices[~valid] == -1).all() and (lists.indices[valid] >= 0).all()


@pytest.mark.parametrize(
    "bad, message",
    [("heads", "do not fit"), ("blocks", "built for"), ("dtype", "int32"), ("size", "powers of two")],
)
def test_bad_lists_get_one_line_errors(bad, message):
    q = torch.randn(1, 4, 32, 16)
    k = v = torch.randn(1, 2, 32, 16)
    lists = dense_lists(1, 4, 32, 32, block_q=16, block_k=16, q_offset=0)
    if bad == "heads":
        lists = dense_lists(1, 3, 32, 32, block_q=16, block_k=16, q_offset=0)
    elif bad == "blocks":
        lists = dense_lists(1, 4, 48, 48, block_q=16, block_k=16, q_offset=0)
    elif bad == "dtype":
        lists = type(lists)(lists.indices.long(), lists.counts, 16, 16, 0, 32, 32)
    elif bad == "size":
        lists = type(lists)(lists.indices, lists.counts, 16, 24, 0, 32, 32)
    with pytest.raises(LightTransferError, match=message):
        block_sparse_attention(q, k, v, lists)


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("gqa4-N=101", "chunk-of-last-23", "padding-left",
                                                                "kv-head-lists-gqa2")], ids=lambda c: c.id)
def test_sdpa_variant_matches_the_reference(case):
    """The runtime's CPU path equals the reference, except padding rows (no key), which see their own key."""
    from lighttransfer.kernels.sparse_prefill import block_sparse_attention_sdpa

    q, k, v, lists, kv_start = _make(case, torch.float32, seed=5)
    want, lse = block_sparse_attention_reference(q.cpu(), k.cpu(), v.cpu(), lists.to("cpu"),
                                                 kv_start=None if kv_start is None else kv_start.cpu(),
                                                 return_lse=True)
    got = block_sparse_attention_sdpa(q.cpu(), k.cpu(), v.cpu(), lists.to("cpu"),
                                      kv_start=None if kv_start is None else kv_start.cpu())
    seen = torch.isfinite(lse)
    torch.testing.assert_close(got[seen], want[seen], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got).all()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize(
    "case",
    [
        Case("gpu-tiles-gqa4-D128", n_kv=1537, block_q=128, block_k=64, heads=8, kv_heads=2, dim=128, keep_share=0.3,
             local_blocks=2),
        Case("gpu-tiles-chunk-D64", n_kv=2049, n=700, block_q=128, block_k=64, heads=4, kv_heads=1, dim=64,
             keep_share=0.2),
        Case("gpu-tiles-kv-lists-padding", n_kv=1023, block_q=64, block_k=64, heads=4, kv_heads=2, dim=128,
             list_heads="kv", batch=2, kv_start=(0, 300)),
        Case("gpu-tiles-D256", n_kv=777, block_q=64, block_k=64, heads=2, kv_heads=1, dim=256),
        # packed (lists per KV head): the 8B group of 4 in a 128-row tile, SmolLM2's group of 3 (96 of 128 rows),
        # a group of 8 of 16 queries, and the largest packed tile (256 rows)
        Case("gpu-packed-gqa4-bq32-D128", n_kv=2049, block_q=32, block_k=64, heads=8, kv_heads=2, dim=128,
             list_heads="kv", keep_share=0.3, local_blocks=2),
        Case("gpu-packed-gqa3-bq32-D64-chunk", n_kv=1500, n=777, block_q=32, block_k=64, heads=9, kv_heads=3,
             dim=64, list_heads="kv", keep_share=0.3),
        Case("gpu-packed-gqa8-bq16", n_kv=1000, block_q=16, block_k=64, heads=8, kv_heads=1, dim=128,
             list_heads="kv", batch=2, kv_start=(0, 123)),
        Case("gpu-packed-256-rows", n_kv=1100, block_q=64, block_k=64, heads=4, kv_heads=1, dim=128,
             list_heads="kv", keep_share=0.4),
    ],
    ids=lambda c: c.id,
)
def test_kernel_matches_reference_on_gpu_tiles(case, dtype):
    """The block sizes the runtime uses on a GPU (128 x 64), with the pinned and the autotuned configs."""
    q, k, v, lists, kv_start = _make(case, dtype, seed=11)
    ref_o = block_sparse_attention_reference(q.float(), k.float(), v.float(), lists, kv_start=kv_start)
    low_o = block_sparse_attention_reference(q, k, v, lists, kv_start=kv_start, compute_dtype=dtype)
    o = block_sparse_attention(q, k, v, lists, kv_start=kv_start)
    assert_within_policy(o, ref_o, low_o, dtype, case.id)


PACKED_CASES = [
    Case("packed-gqa2-ragged-N=53", n_kv=53, heads=4, kv_heads=2, list_heads="kv"),
    Case("packed-gqa3-pad-rows", n_kv=70, heads=6, kv_heads=2, list_heads="kv"),  # 48 rows in a 64-row tile
    Case("packed-gqa4-bq32", n_kv=101, block_q=32, heads=8, kv_heads=2, list_heads="kv"),
    Case("packed-gqa8-N=30<sink+band", n_kv=30, heads=8, kv_heads=1, list_heads="kv", sink_blocks=1,
         local_blocks=2),
    Case("packed-gqa4-chunk-of-last-23", n_kv=120, n=23, heads=4, kv_heads=1, list_heads="kv"),
    Case("packed-gqa2-padding-left", n_kv=60, batch=3, kv_start=(0, 7, 33), list_heads="kv"),
    Case("packed-gqa2-D40-bk32", n_kv=77, block_k=32, dim=40, list_heads="kv"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", PACKED_CASES, ids=lambda c: c.id)
def test_packed_kernel_matches_reference_and_unpacked(case, dtype):
    """The packed layout (a KV head's query heads stacked in one tile) is the same attention as the unpacked one."""
    from lighttransfer.kernels.sparse_prefill import can_pack

    q, k, v, lists, kv_start = _make(case, dtype, seed=hash(case.id) % 1000)
    assert can_pack(q.shape[1], k.shape[1], lists)
    o, lse = block_sparse_attention(q, k, v, lists, kv_start=kv_start, return_lse=True, pack_gqa=True)
    ref_o, ref_lse = block_sparse_attention_reference(q.float(), k.float(), v.float(), lists, kv_start=kv_start,
                                                      return_lse=True)
    low_o, low_lse = block_sparse_attention_reference(q, k, v, lists, kv_start=kv_start, return_lse=True,
                                                      compute_dtype=dtype)
    assert_within_policy(o, ref_o, low_o, dtype, f"{case.id} packed output")
    assert_within_policy(lse, ref_lse, low_lse, dtype, f"{case.id} packed lse")
    o1, lse1 = block_sparse_attention(q, k, v, lists, kv_start=kv_start, return_lse=True, pack_gqa=False)
    assert_within_policy(o1, ref_o, low_o, dtype, f"{case.id} unpacked output")
    assert torch.equal(torch.isinf(lse1), torch.isinf(lse))


def test_packing_needs_lists_per_kv_head():
    case = Case("per-q", n_kv=40, heads=4, kv_heads=2, list_heads="q")
    q, k, v, lists, _ = _make(case, torch.float32, seed=0)
    with pytest.raises(LightTransferError, match="pack_gqa needs lists per KV head"):
        block_sparse_attention(q, k, v, lists, pack_gqa=True)
    big = Case("too-many-rows", n_kv=40, heads=8, kv_heads=1, list_heads="kv", block_q=64)  # 512 rows
    q, k, v, lists, _ = _make(big, torch.float32, seed=0)
    with pytest.raises(LightTransferError, match="rows <= 256"):
        block_sparse_attention(q, k, v, lists, pack_gqa=True)
