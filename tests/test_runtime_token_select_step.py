"""TokenSelect's decode step with the Selection Cache on the device (``_cached_step``): the same selections,
outputs and counts as the general path (the reference semantics, deciding hits on the host) over multi-step decodes
mixing hits and misses, with left padding, GQA, fp32/fp16; ``reuse_max_age`` forcing a miss in both paths; no host
synchronization (structurally on the CPU, ``set_sync_debug_mode`` on CUDA); a CUDA graph of the step."""

from __future__ import annotations

import os

import pytest
import torch
from lighttransfer import kernels
from lighttransfer.hybrid_format import TokenSelectConfig
from lighttransfer.runtime import token_select as ts
from lighttransfer.runtime.token_select import SelectionState, SelectionStats, token_select_attention

needs_interpreter = pytest.mark.skipif(not os.environ.get("TRITON_INTERPRET") and not torch.cuda.is_available(),
                                       reason="the kernels need CUDA or the Triton interpreter (TRITON_INTERPRET=1)")


def _queries(batch, heads, dim, steps, *, seed, dtype, device, jumps):
    """``steps`` queries ``[B, H, 1, D]`` per sequence: a slow drift (hits at reuse 0.9), with a fresh direction
    at the steps in ``jumps[b]`` for sequence ``b`` (misses)."""
    g = torch.Generator().manual_seed(seed)
    cur = torch.randn(batch, heads, 1, dim, generator=g)
    out = []
    for t in range(steps):
        cur = cur + 0.08 * torch.randn(batch, heads, 1, dim, generator=g)
        for b in range(batch):
            if t in jumps[b]:
                cur[b] = torch.randn(heads, 1, dim, generator=g)
        out.append(cur.clone().to(device=device, dtype=dtype))
    return out


def _decode(qs, k, v, first, *, config, kv_start, device_steps, monkeypatch):
    """Run the decode steps (query ``t`` over the first ``first + t`` keys); returns outputs, the states' picks
    (as sets: sorted) and anchors after every step, and the stats."""
    monkeypatch.setattr(ts, "DEVICE_STEPS", device_steps)
    state, stats = SelectionState(), SelectionStats()
    outs, picks, anchors = [], [], []
    for t, q in enumerate(qs):
        n = first + t
        o = token_select_attention(q, k[:, :, :n], v[:, :, :n], config=config, state=state, stats=stats,
                                   kv_start=kv_start, scale=None)
        outs.append(o.float())
        picks.append(state.picked.sort(-1).values.clone())
        anchors.append(state.anchor_pos.clone())
    return outs, picks, anchors, stats


CASES = [  # batch, heads, kv_heads, dtype, padded, max_age, reuse_against
    (3, 4, 2, torch.float32, True, 64, "anchor"),
    (2, 4, 1, torch.float16, False, 64, "anchor"),
    (3, 2, 2, torch.float32, True, 3, "anchor"),  # max_age forces misses of similar queries
    (3, 4, 2, torch.float32, True, 64, "previous"),  # compared with the previous query: more hits on a drift
]


@needs_interpreter
@pytest.mark.parametrize("topk", ["torch", "radix"])
@pytest.mark.parametrize("batch,heads,kv_heads,dtype,padded,max_age,against", CASES)
def test_device_step_equals_the_general_path(batch, heads, kv_heads, dtype, padded, max_age, against, topk,
                                             monkeypatch):
    """Also with the radix top-k, which leaves the hits' rows unwritten: the same selections, step by step."""
    import lighttransfer.kernels.token_select as kts

    monkeypatch.setattr(ts, "KERNELS_ON_CPU", True)
    monkeypatch.setattr(kts, "TOPK", topk)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dim, first, steps = 16, 48, 9
    g = torch.Generator().manual_seed(1)
    k = torch.randn(batch, kv_heads, first + steps, dim, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(batch, kv_heads, first + steps, dim, generator=g).to(device=device, dtype=dtype)
    kv_start = torch.tensor([0, 5, 2][:batch], device=device) if padded else None
    config = TokenSelectConfig(k=6, init=2, local=4, reuse=0.9, reuse_max_age=max_age, reuse_against=against)
    qs = _queries(batch, heads, dim, steps, seed=2, dtype=dtype, device=device,
                  jumps=[{3}, {1, 6}, set()][:batch])
    ref = _decode(qs, k, v, first, config=config, kv_start=kv_start, device_steps=False, monkeypatch=monkeypatch)
    new = _decode(qs, k, v, first, config=config, kv_start=kv_start, device_steps=True, monkeypatch=monkeypatch)
    for t in range(steps):
        assert torch.equal(ref[1][t], new[1][t]), f"step {t}: picks differ"
        assert torch.equal(ref[2][t], new[2][t]), f"step {t}: anchors differ"
        torch.testing.assert_close(new[0][t], ref[0][t], atol=2e-3 if dtype == torch.float16 else 1e-5, rtol=0)
    assert (new[3].lookups, new[3].hits) == (ref[3].lookups, ref[3].hits)
    assert new[3].lookups == batch * steps and 0 < new[3].hits < new[3].lookups - batch  # hits and misses mixed
    ages = torch.stack([first + t - 1 - a for t, a in enumerate(new[2])])  # each step's selection's age
    assert int(ages.max()) <= max_age
    if max_age == 3:
        assert int(ages.max()) == 3  # the drift would have reused longer: the bound made misses


@needs_interpreter
def test_max_age_turns_a_similar_query_into_a_miss_in_both_paths(monkeypatch):
    monkeypatch.setattr(ts, "KERNELS_ON_CPU", True)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 1, 40, 8, generator=g)
    v = torch.randn(1, 1, 40, 8, generator=g)
    q = torch.randn(1, 2, 1, 8, generator=g)
    for device_steps in (False, True):
        monkeypatch.setattr(ts, "DEVICE_STEPS", device_steps)
        config = TokenSelectConfig(k=3, init=1, local=2, reuse=0.5, reuse_max_age=2)
        state, stats = SelectionState(), SelectionStats()
        for n in range(30, 34):  # the same query: similar each step, but the selection ages
            token_select_attention(q, k[:, :, :n], v[:, :, :n], config=config, state=state, stats=stats,
                                   kv_start=None, scale=None)
        # 29 misses (no cache), 30 and 31 hit (ages 1 and 2), 32 is age 3 > 2: a miss, the anchor moves
        assert (stats.lookups, stats.hits) == (4, 2) and int(state.anchor_pos) == 32


@needs_interpreter
@pytest.mark.parametrize("topk", ["torch", "radix"])
def test_the_device_step_reads_nothing_back_to_the_host(topk, monkeypatch):
    """Structural: with every tensor -> Python conversion made to fail, the cached step still runs (the general
    path, which decides hits on the host, does not), and it takes the counts on the device."""
    import lighttransfer.kernels.token_select as kts

    monkeypatch.setattr(ts, "KERNELS_ON_CPU", True)
    monkeypatch.setattr(kts, "TOPK", topk)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 2, 40, 16, generator=g)
    v = torch.randn(2, 2, 40, 16, generator=g)
    q = torch.randn(2, 4, 1, 16, generator=g)
    config = TokenSelectConfig(k=4, init=2, local=4, reuse=0.5)
    state, stats = SelectionState(), SelectionStats()
    token_select_attention(q, k[:, :, :38], v[:, :, :38], config=config, state=state, stats=stats, kv_start=None,
                           scale=None)

    def refuse(*_a, **_k):
        raise AssertionError("host synchronization in the decode step")

    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "cpu", "numpy", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    token_select_attention(q, k[:, :, :39], v[:, :, :39], config=config, state=state, stats=stats,
                           kv_start=torch.tensor([0, 3]), scale=None)
    monkeypatch.setattr(ts, "DEVICE_STEPS", False)
    with pytest.raises(AssertionError, match="host synchronization"):
        token_select_attention(q, k, v, config=config, state=state, stats=stats, kv_start=None, scale=None)
    monkeypatch.undo()
    assert stats.counts and (stats.lookups, stats.hits) == (4, 2)


def test_stats_count_on_the_device_and_reset_in_place():
    stats = SelectionStats()
    stats.add(lookups=3, hits=1, dense=2)
    stats.add_on_device(2, torch.tensor([True, False]))
    counter = next(iter(stats.counts.values()))
    assert stats.to_dict() == {"lookups": 5, "hits": 2, "dense": 2, "hit_rate": 0.4}
    stats.reset()
    assert next(iter(stats.counts.values())) is counter and stats.to_dict()["lookups"] == 0


def test_reference_list_of_static_width_equals_the_host_width_one():
    """``assemble_indices(recent_width=...)``: the same keys as the host-computed width, -1 in the slots left."""
    picked = torch.tensor([[[3, 7, -1]], [[4, 9, 5]]])
    start = torch.tensor([0, 2])
    recent = torch.tensor([[14], [16]])
    host = kernels.assemble_indices(picked, n_keys=20, init=2, local=3, kv_start=start, recent_start=recent)
    fixed = kernels.assemble_indices(picked, n_keys=20, init=2, local=3, kv_start=start, recent_start=recent,
                                     recent_width=3 + 8)
    assert fixed.shape[-1] == 2 + 3 + 11 and fixed.shape[-1] > host.shape[-1]
    for b in range(2):
        assert set(fixed[b, 0].tolist()) - {-1} == set(host[b, 0].tolist()) - {-1}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_step_has_no_sync_and_replays_in_a_cuda_graph(monkeypatch):
    monkeypatch.setattr(ts, "KERNELS_ON_CPU", False)
    dev, dt = "cuda", torch.bfloat16
    batch, heads, kv_heads, dim, n = 4, 8, 2, 128, 4096
    g = torch.Generator(device=dev).manual_seed(0)
    k = torch.randn(batch, kv_heads, n, dim, device=dev, dtype=dt, generator=g)
    v = torch.randn(batch, kv_heads, n, dim, device=dev, dtype=dt, generator=g)
    base = torch.randn(batch, heads, 1, dim, device=dev, dtype=dt, generator=g)
    q = base.clone()
    config = TokenSelectConfig(k=256, init=16, local=64, reuse=0.9)

    def fresh_state():
        state, stats = SelectionState(), SelectionStats()
        token_select_attention(base, k, v, config=config, state=state, stats=stats, kv_start=None, scale=None)
        return state, stats

    def step(state, stats):
        return token_select_attention(q, k, v, config=config, state=state, stats=stats, kv_start=None, scale=None)

    state, stats = fresh_state()
    step(state, stats)  # compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(state, stats)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    # a graph of the step, replayed over queries that hit, miss (sequence 1 jumps) then hit again
    plan = [base + 0.01 * torch.randn_like(base) for _ in range(4)]
    plan[1][1] = torch.randn_like(base[1])
    eager_state, eager_stats = fresh_state()
    eager_stats.reset()  # count the plan's steps only, as the graph's counts below do
    eager = []
    for p in plan:
        q.copy_(p)
        eager.append(step(eager_state, eager_stats).clone())
    graph_state, graph_stats = fresh_state()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        saved = [t.clone() for t in (graph_state.anchor, graph_state.picked, graph_state.anchor_pos)]
        q.copy_(plan[0])
        step(graph_state, graph_stats)  # warm-up on the side stream, then put the state back
        for t, s in zip((graph_state.anchor, graph_state.picked, graph_state.anchor_pos), saved, strict=True):
            t.copy_(s)
    torch.cuda.current_stream().wait_stream(side)
    graph_stats.reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(graph_state, graph_stats)
    graph_stats.reset()
    for p, want in zip(plan, eager, strict=True):
        q.copy_(p)
        graph.replay()
        torch.testing.assert_close(out, want, atol=0, rtol=0)
    assert graph_stats.to_dict() == eager_stats.to_dict()
    assert eager_stats.lookups == len(plan) * batch and 0 < eager_stats.hits < eager_stats.lookups


def test_reuse_max_age_in_the_config_block_load_and_convert(tiny_model_dir, tmp_path, capsys):
    import json

    import lighttransfer
    from conftest import run_cli
    from lighttransfer.errors import LightTransferError
    from lighttransfer.hybrid_format import HybridConfig
    from lighttransfer.runtime import runtime_of

    base = HybridConfig(num_layers=4, num_kv_heads=2, streaming_layers=[1])
    default = base.with_selection(TokenSelectConfig(k=8)).to_dict()
    assert "select_reuse_max_age" not in default  # the default is not written: older readers read the block
    assert HybridConfig.from_dict(default).selection.reuse_max_age == 64
    aged = base.with_selection(TokenSelectConfig(k=8, reuse_max_age=5)).to_dict()
    assert aged["select_reuse_max_age"] == 5
    assert HybridConfig.from_dict(json.loads(json.dumps(aged))).selection == TokenSelectConfig(k=8, reuse_max_age=5)
    with pytest.raises(LightTransferError, match="only meaningful"):
        HybridConfig.from_dict({**base.to_dict(), "select_reuse_max_age": 5})
    with pytest.raises(LightTransferError, match="select_reuse_max_age"):
        TokenSelectConfig(reuse_max_age=0)
    assert TokenSelectConfig(k=8, init=2, local=4, reuse_max_age=5).reuse_width == 19
    model = lighttransfer.load(tiny_model_dir, device="cpu", decode="tokenselect", select_reuse_max_age=7)
    assert runtime_of(model).layout.selection.reuse_max_age == 7
    out = tmp_path / "hybrid"
    code, _, err = run_cli(["convert", str(tiny_model_dir), "--layers", "1", "--out", str(out), "--decode",
                            "tokenselect", "--select-k", "16", "--select-reuse-max-age", "9"], capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["lighttransfer"]["select_reuse_max_age"] == 9
    assert runtime_of(lighttransfer.load(out, device="cpu")).layout.selection.reuse_max_age == 9
