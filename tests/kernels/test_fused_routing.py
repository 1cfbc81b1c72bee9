"""The fused QAdA decode step (decision + routed attention) vs its PyTorch reference (today's decision composed with
the routed reference), every Triton variant (three launches: two passes and a merge; one launch, every program
deciding its pair, and the merge; the overlapped launch, the bulk attended beside the decision, and its merge, with
the bulk programs before or after the deciding ones): outputs, flags, moments after the step, counts, and consecutive steps on the
same counters."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from kernel_error_policy import DEVICE, DTYPE_IDS, DTYPES, assert_within_policy
from lighttransfer.errors import LightTransferError
from lighttransfer.kernels import head_routing as rule
from lighttransfer.kernels.fused_routing import (
    fold_leaving_key,
    fused_routed_decode,
    fused_routed_decode_reference,
)
from lighttransfer.kernels.reference import masked_attention
from lighttransfer.kernels.routed_decode import routed_decode_reference, routed_visibility

SINK, WINDOW = 4, 13  # local set 17
# overlap-bulk-first: the overlapped kernel with its bulk programs first (the interpreter runs programs in order,
# so all of them attend before the decision lands, which the merge must then discard for local pairs) and a state
# read before every tile
VARIANTS = ["three-launch", "one-launch", "overlap", "overlap-bulk-first", "balanced"]


@pytest.fixture(params=VARIANTS)
def variant(request, monkeypatch):
    if request.param != "overlap-bulk-first":
        return request.param
    from lighttransfer.kernels import fused_routing_overlap_triton as overlap

    monkeypatch.setattr(overlap, "fused_overlap_triton",
                        functools.partial(overlap.fused_overlap_triton, local_last=True, poll=1))
    return "overlap"


def _inputs(batch, kv_heads, group, n_keys, dim, dtype, seed, capacity=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 1, kv_heads * group, dim, generator=g).to(DEVICE, dtype).transpose(1, 2)
    capacity = n_keys if capacity is None else capacity
    # keys with a mean and per-head scales, so the far shares spread over (0, 1)
    shift = torch.randn(1, kv_heads, 1, dim, generator=g)
    k = (torch.randn(batch, kv_heads, capacity, dim, generator=g) * 1.5 + shift).to(DEVICE, dtype)[:, :, :n_keys]
    v = torch.randn(batch, kv_heads, capacity, dim, generator=g).to(DEVICE, dtype)[:, :, :n_keys]
    return q, k, v


def _moments(k, n, kv_start, *, diagonal):
    """The bulk moments of the query before the last of ``n`` keys: ``[kv_start + sink, n - 1 - window)``."""
    batch, kv_heads, _, dim = k.shape
    m = rule.KeyMoments.zeros(batch, kv_heads, dim, diagonal=diagonal, device=k.device)
    rule.move_range(m, k, old=(0, 0), new=(0, max(0, n - 1 - WINDOW)), floor=kv_start + SINK)
    return m


def _clone(m):
    return rule.KeyMoments(m.count.clone(), m.first.clone(), m.second.clone())


def _shares(q, k, m, kv_start, n_valid=None):
    """The reference's largest far share per (sequence, KV head) after the step's fold, and which are decided."""
    m = _clone(m)
    n = k.shape[2] if n_valid is None else n_valid
    fold_leaving_key(m, k, n, floor=kv_start + SINK, window=WINDOW)
    far = rule.predicted_far_share(q, k, m, n_keys=n, kv_start=kv_start, sink=SINK, window=WINDOW)
    decided = rule.bulk_count(n, kv_start, sink=SINK, window=WINDOW) > 0
    return rule.group_max(far, k.shape[1]), decided


def _mixed_tau(share, decided):
    """A tau between two of the decided pairs' shares, well away from both (no tie at rounding level)."""
    values = sorted(set(share[decided].flatten().tolist()))
    if len(values) < 2:
        return 0.5
    gaps = [(values[i + 1] - values[i], i) for i in range(len(values) - 1)]
    mid = len(values) // 2
    gap, i = max(gaps, key=lambda g: (g[0] > 1e-3, -abs(g[1] - mid + 0.5)))
    assert gap > 1e-3, values
    return (values[i] + values[i + 1]) / 2


def _check(q, k, v, m, tau, dtype, what, *, kv_start, n_valid=None, workspace=None, **kw):
    want_m = _clone(m)
    want_c = torch.zeros(2, dtype=torch.float64, device=DEVICE)
    got_c = want_c.clone()
    ref_o, ref_local = fused_routed_decode_reference(q, k, v, want_m, tau=tau, sink=SINK, window=WINDOW,
                                                     kv_start=kv_start, n_valid=n_valid, counts=want_c)
    o, local = fused_routed_decode(q, k, v, m, tau=tau, sink=SINK, window=WINDOW, kv_start=kv_start, n_valid=n_valid,
                                   counts=got_c, workspace=workspace, **kw)
    assert o.shape == q.shape and o.dtype == q.dtype and local.dtype == torch.bool
    assert torch.equal(local, ref_local), f"{what}: flags {local.tolist()} != {ref_local.tolist()}"
    assert torch.equal(got_c, want_c), f"{what}: counts {got_c.tolist()} != {want_c.tolist()}"
    torch.testing.assert_close(m.count, want_m.count, rtol=0, atol=0)
    torch.testing.assert_close(m.first, want_m.first, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(m.second, want_m.second, rtol=1e-6, atol=1e-4)
    ref = routed_decode_reference(q, k, v, local, sink=SINK, window=WINDOW, kv_start=kv_start, n_valid=n_valid)
    visible = routed_visibility(q.shape[0], q.shape[1], k.shape[2], local, sink=SINK, window=WINDOW,
                                kv_start=kv_start, n_valid=n_valid, device=q.device)
    low, _ = masked_attention(q, k, v, visible, 1 / math.sqrt(q.shape[-1]), compute_dtype=dtype)
    assert_within_policy(o, ref, low.to(dtype), dtype, what)
    assert_within_policy(o, ref_o, low.to(dtype), dtype, what + " (vs the fused reference)")
    return local


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("diagonal", [False, True], ids=["full", "diag"])
@pytest.mark.parametrize("group", [1, 3, 4], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("n_keys", [9, 17, 18, 19, 70], ids=lambda n: f"N{n}")
def test_matches_reference_mixed(n_keys, group, diagonal, dtype, variant):
    """Edge lengths at sink 4 + window 13 = 17 (below: no bulk, every pair local; at it; one and two past, when the
    first key leaves the window; far past), a mixed tau, left padding, forced chunk counts in both passes."""
    q, k, v = _inputs(2, 2, group, n_keys, 32, dtype, seed=n_keys + 10 * group, capacity=n_keys + 5)
    start = torch.tensor([0, 3], device=DEVICE)
    m = _moments(k, n_keys, start, diagonal=diagonal)
    share, decided = _shares(q, k, m, start)
    tau = _mixed_tau(share, decided)
    local = _check(q, k, v, m, tau, dtype, f"N={n_keys} group={group}", kv_start=start, splits=3, local_splits=2,
                   variant=variant)
    if n_keys >= 40:
        assert local.any() and not local.all()  # the mix this test is for


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("dim", [16, 40], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("extreme", ["all-local", "all-full"])
def test_tau_extremes(extreme, dim, dtype, variant):
    """tau 1: every pair local (the streaming rule); tau 0: every pair with a bulk full (dense)."""
    q, k, v = _inputs(3, 2, 2, 64, dim, dtype, seed=dim)
    start = torch.tensor([0, 1, 9], device=DEVICE)
    m = _moments(k, 64, start, diagonal=dim == 40)
    local = _check(q, k, v, m, 1.0 if extreme == "all-local" else 0.0, dtype, extreme, kv_start=start,
                   splits=4, local_splits=3, variant=variant)
    assert bool(local.all()) == (extreme == "all-local") and bool(local.any()) == (extreme == "all-local")


@pytest.mark.parametrize("diagonal", [False, True], ids=["full", "diag"])
def test_left_padding_and_default_plan(diagonal, variant):
    """kv_start per sequence (int32 too), one sequence whose padding leaves it no bulk, none at all; the default
    chunk plan."""
    dtype = DTYPES[-1]
    q, k, v = _inputs(3, 2, 4, 90, 32, dtype, seed=5)
    for start in (torch.tensor([0, 20, 80], device=DEVICE), torch.tensor([2, 7, 75], device=DEVICE,
                                                                         dtype=torch.int32)):
        m = _moments(k, 90, start.long(), diagonal=diagonal)
        share, decided = _shares(q, k, m, start.long())
        assert decided.tolist() == [True, True, False]
        _check(q, k, v, m, _mixed_tau(share, decided), dtype, f"padded {start.tolist()}", kv_start=start,
               variant=variant)
    none = torch.zeros(3, dtype=torch.long, device=DEVICE)  # no kv_start at all: no padding
    m = _moments(k, 90, none, diagonal=diagonal)
    share, decided = _shares(q, k, m, none)
    _check(q, k, v, m, _mixed_tau(share, decided), dtype, "no kv_start", kv_start=None, variant=variant)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("diagonal", [False, True], ids=["full", "diag"])
def test_consecutive_static_steps_reuse_the_counters(diagonal, dtype, variant):
    """Static steps over preallocated storage (device-side n_valid), one workspace: each step equals the
    reference (the tickets were set back to zero), the moments follow the bulk key by key, and the workspace is
    zero after every launch."""
    from lighttransfer.kernels.fused_routing_triton import FusedWorkspace

    q, k, v = _inputs(2, 2, 3, 60, 32, dtype, seed=3)
    start = torch.tensor([0, 6], device=DEVICE)
    m = _moments(k, 40, start, diagonal=diagonal)
    ws = FusedWorkspace.zeros(2, 2, DEVICE)
    for n in range(40, 46):
        nv = torch.tensor([n], device=DEVICE)
        share, decided = _shares(q, k, m, start, n_valid=nv)
        _check(q, k, v, m, _mixed_tau(share, decided), dtype, f"step n={n}", kv_start=start, n_valid=nv,
               workspace=ws, splits=5, local_splits=2, variant=variant)
        assert not ws.pair.any() and not ws.sequence.any() and not ws.state.any()
    fresh = _moments(k, 46, start, diagonal=diagonal)  # the bulk of the next query, from scratch
    torch.testing.assert_close(m.first, fresh.first, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(m.second, fresh.second, rtol=1e-5, atol=1e-3)
    assert torch.equal(m.count, fresh.count)


# bf16 on the GPU only: Triton's interpreter returns garbage for bf16 (the dense kernel's too, 1e8 off)
EDGE_DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", EDGE_DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("group", [1, 2, 4, 8], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("n_keys", [10, 17, 18, 33], ids=lambda n: f"N{n}")
def test_one_launch_edges_match_three_launch(n_keys, group, dtype):
    """The one-launch kernel at edge lengths (below sink + window: no bulk; at it; one past: the first key leaves
    the window; a few chunks past), left padding (kv_start, one sequence padded past its bulk) and a device-side
    n_valid inside larger storage, GQA 1 to 8, fp16 / fp32 (bf16 too on the GPU): the reference's output, flags,
    moments and counts, and the three-launch path's flags and counts exactly, its moments to an ulp."""
    from lighttransfer.kernels.fused_routing_triton import FusedWorkspace

    q, k_all, v_all = _inputs(3, 2, group, n_keys + 6, 32, dtype, seed=n_keys * 7 + group + 1)
    k = k_all[:, :, :n_keys]
    start = torch.tensor([0, 2, max(0, n_keys - 15)], device=DEVICE, dtype=torch.int32)
    nv = torch.tensor([n_keys], device=DEVICE)
    m = _moments(k, n_keys, start.long(), diagonal=group % 4 == 2)
    share, decided = _shares(q, k, m, start.long())
    tau = _mixed_tau(share, decided)
    three = _clone(m)
    ws = FusedWorkspace.zeros(3, 2, DEVICE)
    local = _check(q, k_all, v_all, m, tau, dtype, f"N={n_keys} group={group}", kv_start=start, n_valid=nv,
                   workspace=ws, splits=3, variant="one-launch")
    assert not ws.pair.any() and not ws.sequence.any()
    counts = torch.zeros(2, dtype=torch.float64, device=DEVICE)
    _, local3 = fused_routed_decode(q, k_all, v_all, three, tau=tau, sink=SINK, window=WINDOW, kv_start=start,
                                    n_valid=nv, counts=counts, splits=3, local_splits=2, variant="three-launch")
    assert torch.equal(local, local3)
    assert torch.equal(m.count, three.count)
    # the same fold in both kernels (the GPU may contract it into an FMA in one and not the other: an ulp)
    torch.testing.assert_close(m.first, three.first, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.second, three.second, rtol=1e-6, atol=1e-6)
    assert counts[1].item() == 2 * decided.sum().item()  # decided pairs: 2 KV heads per decided sequence
    if n_keys <= SINK + WINDOW:
        assert local.all() and counts[1].item() == 0  # no bulk: local without a decision


def test_the_launcher_takes_three_launches_and_the_one_launch_byte_count():
    """The launcher takes the three-launch path at every batch (timed faster on an H200 at batch 1, where the byte
    count had favoured the one launch); the one launch's extra reads per pair: 32 bulk programs read the local keys
    and the moments again, the local program its keys twice."""
    from lighttransfer.kernels.fused_routing import pick_variant
    from lighttransfer.kernels.fused_routing_one_triton import extra_bytes, plan_one_launch

    chunk, n_splits = plan_one_launch(1, 8, 32768, cuda_sms=132)
    assert (chunk, n_splits) == (1024, 32)
    for batch in (1, 2, 16):
        q = torch.zeros(batch, 32, 1, 128, dtype=torch.bfloat16)
        k = torch.zeros(batch, 8, 64, 128, dtype=torch.bfloat16)
        assert pick_variant(q, k, sink=4, window=1020, diagonal=False) == "three-launch"
    assert extra_bytes(1, 8, 32, 1024, 128, 2, diagonal=False) == 8 * (32 * (1024 * 256 + 4 * 128 * 128) + 1024 * 256)
    assert extra_bytes(2, 8, 32, 1024, 128, 2, diagonal=True) == 16 * (32 * (1024 * 256 + 4 * 128) + 1024 * 256)


def test_one_line_errors():
    q, k, v = _inputs(2, 2, 2, 30, 16, torch.float32, seed=0)
    m = _moments(k, 30, torch.zeros(2, dtype=torch.long, device=DEVICE), diagonal=False)
    kw = dict(tau=0.5, sink=SINK, window=WINDOW)
    with pytest.raises(LightTransferError, match="one query"):
        fused_routed_decode(torch.cat([q, q], 2), k, v, m, **kw)
    bad = rule.KeyMoments(m.count, m.first, m.second.double())
    with pytest.raises(LightTransferError, match="moments.second"):
        fused_routed_decode(q, k, v, bad, **kw)
    with pytest.raises(LightTransferError, match="moments.first"):
        fused_routed_decode(q, k, v, rule.KeyMoments(m.count, m.first[:1], m.second), **kw)
    with pytest.raises(LightTransferError, match="counts"):
        fused_routed_decode(q, k, v, m, counts=torch.zeros(2, device=DEVICE), **kw)
    with pytest.raises(LightTransferError, match="tau"):
        fused_routed_decode(q, k, v, m, **{**kw, "tau": float("nan")})
    with pytest.raises(LightTransferError, match="window"):
        fused_routed_decode(q, k, v, m, **{**kw, "window": 0})
    with pytest.raises(LightTransferError, match="variant"):
        fused_routed_decode(q, k, v, m, variant="two-launch", **kw)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("diagonal", [False, True], ids=["full", "diag"])
def test_on_cuda_a_captured_step_replays_as_eager_steps(diagonal, variant):
    """One capture, replays at growing n_valid: each replay's output, flags, moments and counts are those of eager
    steps (the tickets reset inside the graph)."""
    from lighttransfer.kernels.fused_routing_triton import FusedWorkspace

    dtype = torch.bfloat16
    q, k, v = _inputs(4, 2, 4, 3000, 64, dtype, seed=9)
    start = torch.tensor([0, 3, 100, 7], device=DEVICE)
    m_graph = _moments(k, 2000, start, diagonal=diagonal)
    m_eager = _clone(m_graph)
    c_graph, c_eager = (torch.zeros(2, dtype=torch.float64, device=DEVICE) for _ in range(2))
    ws_graph, ws_eager = FusedWorkspace.zeros(4, 2, DEVICE), FusedWorkspace.zeros(4, 2, DEVICE)
    nv = torch.tensor([2000], device=DEVICE)
    kw = dict(tau=0.3, sink=SINK, window=WINDOW, kv_start=start, variant=variant)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compilation) on copies, so the graph's tensors start untouched
        fused_routed_decode(q, k, v, _clone(m_graph), n_valid=nv.clone(), **kw)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_graph, local_graph = fused_routed_decode(q, k, v, m_graph, n_valid=nv, counts=c_graph, workspace=ws_graph,
                                                   **kw)
    for n in range(2000, 2006):
        nv.fill_(n)
        graph.replay()
        o, local = fused_routed_decode(q, k, v, m_eager, n_valid=torch.tensor([n], device=DEVICE), counts=c_eager,
                                       workspace=ws_eager, **kw)
        torch.cuda.synchronize()
        assert torch.equal(local_graph, local) and torch.equal(o_graph, o)
        assert torch.equal(m_graph.second, m_eager.second) and torch.equal(c_graph, c_eager)


@pytest.mark.parametrize("rows,local_splits", [(16, 1), (16, 2), (64, 2)], ids=["16x1", "16x2", "64x2"])
@pytest.mark.parametrize("dim", [40, 64], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("spread", ["three-launch", "overlap"])
def test_full_covariance_fold_spread_over_the_local_programs(spread, dim, rows, local_splits, monkeypatch):
    """The full covariance's Σkkᵀ in blocks of ``rows`` rows over the pair's local programs, round robin: four
    16-row blocks (at D 40 the last one partly masked, the third too) folded by one program or two (blocks 0, 2
    and 1, 3), or one 64-row block and a program that folds none; every row updated once, the partial qᵀΣq
    summed into the reference's decisions and moments, over two consecutive steps."""
    from lighttransfer.kernels import fused_routing_triton as three

    monkeypatch.setattr(three, "FOLD_ROWS", rows)
    assert three.plan_fused(2, 2, 70, SINK + WINDOW, cuda_sms=None, splits=3, local_splits=local_splits)[1] \
        == local_splits
    dtype = DTYPES[-1]
    q, k, v = _inputs(2, 2, 4, 71, dim, dtype, seed=dim + rows + local_splits)
    start = torch.tensor([0, 3], device=DEVICE)
    m = _moments(k, 70, start, diagonal=False)
    for n in (70, 71):  # two consecutive steps: each folds its own leaving key into the moments the last one left
        share, decided = _shares(q, k[:, :, :n], m, start)
        _check(q, k[:, :, :n], v[:, :, :n], m, _mixed_tau(share, decided), dtype,
               f"{rows}-row blocks over {local_splits} programs, {n} keys", kv_start=start, splits=3,
               local_splits=local_splits, variant=spread)
        q = q.flip(1)


@pytest.mark.parametrize("programs", [1, 2, 5, 13], ids=lambda p: f"P{p}")
@pytest.mark.parametrize("min_units", [1, 3], ids=lambda u: f"min{u}")
@pytest.mark.parametrize("tau", ["mixed", "all-full"])
def test_balanced_pieces_cross_pairs_and_the_merge_reads_only_their_slots(programs, min_units, tau, monkeypatch):
    """The balanced pass 2: the full pairs' bulk units cut into equal pieces over ``programs`` programs (one piece
    per pair a program crosses; pieces of at least ``min_units`` units), left padding clipping the first units, and
    the merge taking each pair's used slots only: every bulk slot holds NaN before pass 2, so a merge that read a
    slot no piece wrote would fail."""
    import lighttransfer.kernels.fused_routing_balanced_triton as bal

    monkeypatch.setattr(bal, "INTERPRETER_MIN_UNITS", min_units)
    seen = {}
    launch = bal.launch_balanced

    def poisoned(*args, **kw):  # after pass 1: its local slots written, the bulk slots not yet
        part_o, part_lse = args[6], args[7]
        part_o[..., kw["n_local"]:, :] = float("nan")
        part_lse[..., kw["n_local"]:] = float("nan")
        seen.update(kw)
        return launch(*args, **kw)

    monkeypatch.setattr(bal, "launch_balanced", poisoned)
    dtype = torch.float32
    q, k, v = _inputs(3, 2, 2, 90, 16, dtype, seed=programs + 7 * min_units)
    start = torch.tensor([0, 11, 40], device=DEVICE)
    m = _moments(k, 90, start, diagonal=False)
    share, decided = _shares(q, k, m, start)
    value = _mixed_tau(share, decided) if tau == "mixed" else 0.0
    local = _check(q, k, v, m, value, dtype, f"P={programs} min={min_units} {tau}", kv_start=start,
                   splits=programs, local_splits=2, variant="balanced")
    assert seen["programs"] == programs and seen["min_units"] == min_units
    assert bool(local.any()) == (tau == "mixed") and not local.all()
