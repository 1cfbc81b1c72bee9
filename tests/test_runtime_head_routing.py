"""Head routing in the runtime (tiny models, fp32, CPU): the two extremes equal dense and streaming decoding, a
continuation chunk routes as decoding would, incremental moments equal fresh ones, realised shares, calibration,
the config block and ``load(head_routing=...)``."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model
from lighttransfer.compat import cache_keyword, output_cache
from lighttransfer.errors import LightTransferError
from lighttransfer.hybrid_format import HeadRoutingConfig, HybridConfig
from lighttransfer.kernels import head_routing as rule
from lighttransfer.runtime import (
    calibrate_head_routing,
    enable_hybrid,
    far_share_distribution,
    far_share_summary,
    head_routing_stats,
    make_cache,
    resolve_layout,
    runtime_of,
)
from lighttransfer.runtime.head_routing import resolve_head_routing

TOL = 1e-5
SINK, WINDOW = 2, 6


def routed(config: HeadRoutingConfig, arch="llama", *, streaming_layers=(), chunks=True):
    model = make_tiny_model(arch)
    layout = resolve_layout(model.config, streaming_layers=list(streaming_layers), sink=SINK, window=WINDOW)
    enable_hybrid(model, layout, head_routing=config)
    runtime_of(model).select_chunks = chunks
    return model


def ids_of(batch, length, seed=0):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def decode_logits(model, ids, split, **kw):
    key = cache_keyword(model)
    extra = {key: make_cache(model)} if hasattr(model, "lighttransfer_runtime") else {}
    with torch.no_grad():
        out = model(ids[:, :split], use_cache=True, **extra, **kw)
        logits = [out.logits[:, -1]]
        for t in range(split, ids.shape[1] - 1):
            out = model(ids[:, t:t + 1], use_cache=True, **{key: output_cache(out)}, **kw)
            logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_all_full_is_dense_and_all_local_is_streaming(arch):
    """tau 0 (nothing local) = the dense model; share 1 (everything local) = every layer streaming, decode only
    (prefill='full': a full prefill, then sink + window)."""
    ids = ids_of(2, 30)
    dense = decode_logits(make_tiny_model(arch), ids, 12)
    full = routed(HeadRoutingConfig(mode="random", share=0.0), arch)
    assert (decode_logits(full, ids, 12) - dense).abs().max().item() <= TOL
    local = routed(HeadRoutingConfig(mode="random", share=1.0), arch)
    streaming = make_tiny_model(arch)
    layout = resolve_layout(streaming.config, streaming_layers=list(range(streaming.config.num_hidden_layers)),
                            sink=SINK, window=WINDOW, prefill="full")
    enable_hybrid(streaming, layout)
    got = decode_logits(local, ids, 12)
    assert (got - decode_logits(streaming, ids, 12)).abs().max().item() <= TOL
    assert (got - dense).abs().max().item() > 1e-3
    stats = head_routing_stats(local)
    assert stats.local_share() == 1.0 and head_routing_stats(full).local_share() == 0.0


@pytest.mark.parametrize("stats", ["bulk", "local"])
@pytest.mark.parametrize("cov", ["full", "diag"])
def test_teacher_forced_chunk_routes_like_decoding(stats, cov):
    """A continuation chunk decides each query as decoding does (same moments, same shares, same logits)."""
    cfg = HeadRoutingConfig(mode="qada", tau=0.67, stats=stats, cov=cov)
    model = routed(cfg)
    ids = ids_of(2, 34, seed=5)
    stepwise = decode_logits(model, ids, 12)
    step_stats = head_routing_stats(model).to_dict()
    head_routing_stats(model).reset()
    with torch.no_grad():
        key = runtime_of(model).cache_keyword
        first = model(ids[:, :12], use_cache=True, **{key: make_cache(model)})
        rest = model(ids[:, 12:-1], use_cache=True, **{key: output_cache(first)})
    chunked = torch.cat([first.logits[:, -1:], rest.logits], 1)
    assert (chunked - stepwise).abs().max().item() <= TOL
    assert head_routing_stats(model).to_dict() == step_stats
    assert 0.0 < step_stats["local_share"] < 1.0  # tau 0.67 routes some heads each way on this model


def test_incremental_moments_equal_moments_from_scratch():
    """After a decode, each layer's running moments are those of its current bulk (or window), recomputed."""
    for stats in ("bulk", "local"):
        model = routed(HeadRoutingConfig(mode="qada", tau=0.2, stats=stats))
        ids = ids_of(1, 28, seed=1)
        key = runtime_of(model).cache_keyword
        cache = make_cache(model)
        with torch.no_grad():
            out = model(ids[:, :10], use_cache=True, **{key: cache})
            for t in range(10, 28):
                out = model(ids[:, t:t + 1], use_cache=True, **{key: output_cache(out)})
        layer = cache.layers[1]
        state = cache.routing_states[1]
        n = layer.keys.shape[2]
        lo, hi = (0, n - WINDOW) if stats == "bulk" else (n - WINDOW, n)
        fresh = rule.KeyMoments.zeros(1, layer.keys.shape[1], layer.keys.shape[3], diagonal=False, device="cpu")
        rule.move_range(fresh, layer.keys, old=(0, 0), new=(lo, hi), floor=torch.tensor([SINK]))
        assert state.range == (lo, hi)
        torch.testing.assert_close(state.moments.first, fresh.first, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(state.moments.second, fresh.second, atol=1e-3, rtol=1e-4)


def test_left_padded_batch_equals_each_sequence_alone():
    cfg = HeadRoutingConfig(mode="qada", tau=0.25)
    model = routed(cfg)
    a, b = ids_of(1, 30, seed=7), ids_of(1, 22, seed=8)
    pad = torch.cat([torch.zeros(1, 8, dtype=torch.long), b], 1)
    ids = torch.cat([a, pad])
    mask = torch.ones_like(ids)
    mask[1, :8] = 0
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        alone_a = model.generate(a, max_new_tokens=8, do_sample=False)
        alone_b = model.generate(b, max_new_tokens=8, do_sample=False)
    assert torch.equal(batch[0, -8:], alone_a[0, -8:]) and torch.equal(batch[1, -8:], alone_b[0, -8:])


def test_oracle_static_and_random_modes():
    """The oracle routes at least as well as dense on its own measure; static masks route exactly those heads."""
    ids = ids_of(1, 30, seed=2)
    oracle = routed(HeadRoutingConfig(mode="oracle", tau=0.5))
    decode_logits(oracle, ids, 10)
    assert 0.0 <= head_routing_stats(oracle).local_share() <= 1.0
    masks = {0: [True, False], 2: [True, True]}
    static = routed(HeadRoutingConfig(mode="static", local_masks=masks))
    decode_logits(static, ids, 10)
    by_layer = head_routing_stats(static).local_share_by_layer()
    assert by_layer == {0: 0.5, 1: 0.0, 2: 1.0, 3: 0.0}
    rnd = routed(HeadRoutingConfig(mode="random", share=0.5, seed=3))
    first = decode_logits(rnd, ids, 10)
    runtime_of(rnd).head_routing.reseed()
    assert torch.equal(decode_logits(rnd, ids, 10), first)  # reseeded: the same draws


def test_hybrid_streaming_layers_are_untouched():
    """Routing applies to the full layers only: a streaming layer decides nothing."""
    model = routed(HeadRoutingConfig(mode="qada", tau=0.1), streaming_layers=[0, 3])
    decode_logits(model, ids_of(1, 30), 10)
    assert set(head_routing_stats(model).local_share_by_layer()) == {1, 2}


def test_calibration_hits_the_target_share():
    model = routed(HeadRoutingConfig(mode="random", share=0.0))
    samples = [ids_of(1, 48, seed=s)[0] for s in range(3)]
    dist = far_share_distribution(model, samples, last=16)
    assert set(dist) == {0, 1, 2, 3} and all(v.shape == (3 * 16, 2) for v in dist.values())
    summary = far_share_summary(dist)
    assert set(summary["0"]) == {"0", "1"} and summary["0"]["1"]["p10"] <= summary["0"]["1"]["p90"]
    assert runtime_of(model).head_routing.config.mode == "random"  # put back
    cfg = calibrate_head_routing(model, samples, share=0.5, last=16)
    assert set(cfg.layer_tau) == {0, 1, 2, 3}
    enable_hybrid(model, runtime_of(model).layout, head_routing=cfg)
    runtime_of(model).select_chunks = True
    with torch.no_grad():
        for ids in samples:  # the calibration text itself: the share is hit up to ties
            out = model(ids[None, :-16], use_cache=True)
            model(ids[None, -16:], use_cache=True, **{cache_keyword(model): output_cache(out)})
    assert abs(head_routing_stats(model).local_share() - 0.5) < 0.05


def test_calibration_decides_a_count_per_sample_when_given_one():
    model = routed(HeadRoutingConfig(mode="random", share=0.0))
    samples = [ids_of(1, 48, seed=s)[0] for s in range(3)]
    dist = far_share_distribution(model, samples, last=[4, 16, 8])
    assert all(v.shape == (4 + 16 + 8, 2) for v in dist.values())
    with pytest.raises(LightTransferError, match="2 counts for 3"):
        far_share_distribution(model, samples, last=[4, 16])
    with pytest.raises(LightTransferError, match="last must be >= 1"):
        far_share_distribution(model, samples, last=[4, 0, 8])


def test_settings_are_validated_with_one_clear_line():
    with pytest.raises(LightTransferError, match="routing_tau"):
        HeadRoutingConfig(mode="qada")
    with pytest.raises(LightTransferError, match="routing_share"):
        HeadRoutingConfig(mode="random")
    with pytest.raises(LightTransferError, match="routing_tau must be in"):
        HeadRoutingConfig(mode="qada", tau=2.0)
    with pytest.raises(LightTransferError, match="routing_stats"):
        HeadRoutingConfig(mode="qada", tau=0.1, stats="everything")
    with pytest.raises(LightTransferError, match="not known"):
        HeadRoutingConfig(mode="sometimes")
    with pytest.raises(LightTransferError, match="needs head_routing"):
        resolve_head_routing(None, mode=None, tau=0.1)


def test_config_block_round_trip(tiny_model_dir, tmp_path):
    """The block stores head routing under its own versioned key; load() reads it and its options override it."""
    import shutil

    import lighttransfer

    cfg = HeadRoutingConfig(mode="qada", tau=0.1, layer_tau={1: 0.05}, cov="diag")
    block = HybridConfig(num_layers=4, num_kv_heads=2, streaming_layers=[0], sink=SINK, window=WINDOW,
                         head_routing=cfg.to_dict())
    d = block.to_dict()
    assert d["head_routing"]["schema_version"] == 1 and d["format_version"] == 1
    assert HybridConfig.from_dict(json.loads(json.dumps(d))).head_routing_config() == cfg
    assert "head_routing" not in HybridConfig(num_layers=4, num_kv_heads=2).to_dict()
    out = tmp_path / "routed"
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["lighttransfer"] = d
    (out / "config.json").write_text(json.dumps(config))
    model = lighttransfer.load(out, device="cpu")
    assert runtime_of(model).head_routing.config == cfg
    model = lighttransfer.load(out, device="cpu", routing_tau=0.3)
    assert runtime_of(model).head_routing.config.tau == 0.3
    model = lighttransfer.load(out, device="cpu", head_routing="dense")
    assert runtime_of(model).head_routing is None
    plain = lighttransfer.load(tiny_model_dir, device="cpu", head_routing="random", routing_share=0.5)
    assert runtime_of(plain).layout.streaming_layers == () or not runtime_of(plain).layout.streaming_layers
    with pytest.raises(LightTransferError, match="routing_tau"):
        lighttransfer.load(tiny_model_dir, device="cpu", head_routing="qada", routing_tau=-1)


def test_convert_stores_head_routing_and_generate_reports_the_share(tiny_model_dir, tmp_path, capsys):
    import lighttransfer
    from conftest import run_cli
    from test_runtime_reference import word_tokenizer

    out = tmp_path / "hybrid"
    code, stdout, err = run_cli(["convert", str(tiny_model_dir), "--layers", "1", "--window", "8", "--sink", "2",
                                 "--out", str(out), "--head-routing", "qada", "--routing-tau", "0.6",
                                 "--routing-cov", "diag"], capsys)
    assert code == 0, err
    assert "head routing qada (tau 0.6, bulk stats, diag covariance)" in stdout
    block = json.loads((out / "config.json").read_text())["lighttransfer"]
    assert block["head_routing"]["tau"] == 0.6 and block["format_version"] == 1
    assert runtime_of(lighttransfer.load(out, device="cpu")).head_routing.config.cov == "diag"
    code, _, err = run_cli(["convert", str(tiny_model_dir), "--layers", "1", "--out", str(tmp_path / "bad"),
                            "--head-routing", "qada"], capsys)
    assert code != 0 and "routing_tau" in err and "Traceback" not in err
    word_tokenizer().save_pretrained(out)
    prompt = " ".join(f"w{i}" for i in range(10, 40))
    code, _, err = run_cli(["generate", str(out), "--prompt", prompt, "--max-new-tokens", "4", "--device", "cpu",
                            "--head-routing", "random", "--routing-share", "1"], capsys)
    assert code == 0, err
    assert "100% of (query, KV head) decisions routed local" in " ".join(err.split())


@pytest.mark.parametrize("config", [HeadRoutingConfig(mode="qada", tau=0.67),
                                    HeadRoutingConfig(mode="qada", tau=0.67, stats="local", cov="diag"),
                                    HeadRoutingConfig(mode="qada", tau=0.67, guard="pages", page=4),
                                    HeadRoutingConfig(mode="oracle", tau=0.67),
                                    HeadRoutingConfig(mode="static", local_masks={1: [True, False]})],
                         ids=["qada-bulk", "qada-local-diag", "qada-pages", "oracle", "static"])
def test_static_steps_route_as_the_dynamic_path(config):
    """Static decode steps (what a CUDA graph replays; eager on the CPU) move the moments on the device and give the
    dynamic path's tokens and shares, left padding included."""
    from lighttransfer.runtime import generate_static

    model = routed(config, chunks=False)
    a, b = ids_of(1, 30, seed=7), ids_of(1, 22, seed=8)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 8, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :8] = 0
    with torch.no_grad():
        dynamic = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    want = head_routing_stats(model).to_dict()
    head_routing_stats(model).reset()
    got = generate_static(model, ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0)
    assert got.decode_path.startswith("eager")  # the CPU: the static steps, without a graph
    assert "head routing" not in got.decode_path
    assert torch.equal(got.sequences[:, -12:], dynamic[:, -12:])
    assert head_routing_stats(model).to_dict() == want


def test_random_routing_keeps_to_dynamic_steps():
    model = routed(HeadRoutingConfig(mode="random", share=0.5))
    cache = make_cache(model)
    with torch.no_grad():
        model(ids_of(1, 12), use_cache=True, **{cache_keyword(model): cache})
    assert "random head routing" in cache.static_unsupported()
    assert make_cache(routed(HeadRoutingConfig(mode="qada", tau=0.5))).static_unsupported() == \
        "the cache is empty (static steps follow a prefill)"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("config", [HeadRoutingConfig(mode="qada", tau=0.67),
                                    HeadRoutingConfig(mode="qada", tau=0.67, guard="pages", page=4),
                                    HeadRoutingConfig(mode="oracle", tau=0.67)], ids=["qada", "qada-pages", "oracle"])
def test_on_cuda_a_captured_graph_routes_as_eager_steps(config):
    """The routed step is captured once and replayed per token: the tokens and the shares of eager static steps
    (the kernels on both sides, fp32)."""
    from lighttransfer.runtime import generate_static

    model = routed(config, chunks=False).cuda()
    ids = ids_of(2, 40, seed=4).cuda()
    eager = generate_static(model, ids, max_new_tokens=16, cuda_graphs=False)
    want = head_routing_stats(model).to_dict()
    head_routing_stats(model).reset()
    graphed = generate_static(model, ids, max_new_tokens=16, cuda_graphs=True)
    assert graphed.decode_path == "cuda graph"
    assert torch.equal(graphed.sequences, eager.sequences)
    assert head_routing_stats(model).to_dict() == want


def test_counts_made_by_static_steps_reset_outside_inference_mode():
    """generate_static decodes under inference mode, which makes the counts inference tensors; resetting them
    afterwards (outside it) must work, and a second run counts what the first did."""
    from lighttransfer.runtime import generate_static

    model = routed(HeadRoutingConfig(mode="qada", tau=0.67), chunks=False)
    ids = ids_of(2, 40, seed=4)
    generate_static(model, ids, max_new_tokens=8)
    want = head_routing_stats(model).to_dict()
    assert want["decisions"] > 0
    head_routing_stats(model).reset()
    assert head_routing_stats(model).to_dict()["decisions"] == 0
    generate_static(model, ids, max_new_tokens=8)
    assert head_routing_stats(model).to_dict() == want


@pytest.mark.parametrize("stats", ["bulk", "local"])
def test_guard_pages_after_decoding_equal_pages_from_scratch(stats):
    """The pages guard's metadata after a prefill and decode steps is that of the bulk keys computed directly
    (whatever the moments' source), and the guard only ever turns heads full (``max(f̂, g) >= f̂``)."""
    from lighttransfer.kernels import routing_guard as rg

    ids = ids_of(1, 40, seed=3)
    shares = {}
    for guard in ("none", "pages"):
        cfg = HeadRoutingConfig(mode="qada", tau=0.5, stats=stats, guard=guard,
                                page=4 if guard == "pages" else None)
        model = routed(cfg)
        key = runtime_of(model).cache_keyword
        cache = make_cache(model)
        with torch.no_grad():
            out = model(ids[:, :12], use_cache=True, **{key: cache})
            for t in range(12, 40):
                out = model(ids[:, t:t + 1], use_cache=True, **{key: output_cache(out)})
        shares[guard] = head_routing_stats(model).local_share()
        if guard == "none":
            assert cache.routing_states[1].pages is None
            continue
        for idx in (0, 2):
            keys, state = cache.layers[idx].keys, cache.routing_states[idx]
            n = keys.shape[2]
            want = rg.from_scratch(keys, lo=torch.tensor([SINK]), hi=n - WINDOW, page=4)
            assert state.page_hi == n - WINDOW and state.pages.pages == want.pages
            assert torch.equal(state.pages.kmax, want.kmax) and torch.equal(state.pages.kmin, want.kmin)
            assert torch.equal(state.pages.count, want.count)
    # the guard only ever adds full heads (on this tiny model's near-uniform scores it adds none: see the planted
    # needle tests for one it must catch)
    assert shares["pages"] <= shares["none"]


@pytest.mark.parametrize("guard", ["none", "pages"])
def test_static_steps_fold_a_needle_into_the_pages_as_the_dynamic_path(guard):
    """Static steps (one device-side key per step) route as dynamic steps do, step for step, while a planted needle
    leaves the window and joins the bulk: the guard turns its KV head full at the end, on both paths, and the
    page metadata equals the direct one; without the guard both paths route it local."""
    from types import SimpleNamespace

    from conftest import planted_needle
    from lighttransfer.kernels import routing_guard as rg
    from lighttransfer.runtime.full_layer import FullLayer
    from lighttransfer.runtime.head_routing import HeadRouting, RoutingState

    S, W = 4, 8
    q, k, scale = planted_needle(True, window=W, n=700, needle_at=600)
    cfg = HeadRoutingConfig(mode="qada", tau=0.05, guard=guard, page=None if guard == "none" else 32)
    start = torch.zeros(1, dtype=torch.long)
    dynamic, static = HeadRouting(cfg, sink=S, window=W), HeadRouting(cfg, sink=S, window=W)
    layer = FullLayer()
    layer.update(k[:, :, :500], k[:, :, :500])
    cache = SimpleNamespace(sequence=SimpleNamespace(kv_start=None), layers=[layer], routing_states={},
                            static_tokens=700)
    layer.make_static(700)
    layer.key_storage[:, :, 500:700] = k[:, :, 500:]  # what the steps would write (nothing reads past n_valid)
    static.begin_static(cache)
    state, fresh = cache.routing_states[0], RoutingState()
    for n in range(501, 701):
        want = dynamic.decide(q, k[:, :, :n], layer_idx=0, state=fresh, kv_start=start, scale=scale)
        got = static.decide(q, layer.key_storage, layer_idx=0, state=state, kv_start=start, scale=scale,
                            n_valid=torch.tensor([n]))
        assert torch.equal(got, want), n
    assert got.tolist() == ([[True, True]] if guard == "none" else [[True, False]])
    if guard == "pages":
        direct = rg.from_scratch(k, lo=start + S, hi=700 - W, page=32, pages=state.pages.pages)
        assert torch.equal(state.pages.kmax, direct.kmax) and torch.equal(state.pages.count, direct.count)


def test_guard_option_round_trips_through_the_block_and_load(tiny_model_dir, tmp_path):
    import shutil

    import lighttransfer

    cfg = HeadRoutingConfig(mode="qada", tau=0.1, guard="pages", page=32)
    d = cfg.to_dict()
    assert d["guard"] == "pages" and d["page"] == 32 and d["schema_version"] == 1
    plain = HeadRoutingConfig(mode="qada", tau=0.1).to_dict()
    assert "guard" not in plain and "page" not in plain  # blocks without a guard read as before
    assert HeadRoutingConfig.from_dict(plain).guard == "none"
    block = HybridConfig(num_layers=4, num_kv_heads=2, streaming_layers=[0], sink=SINK, window=WINDOW,
                         head_routing=d).to_dict()
    assert HybridConfig.from_dict(json.loads(json.dumps(block))).head_routing_config() == cfg
    out = tmp_path / "guarded"
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["lighttransfer"] = block
    (out / "config.json").write_text(json.dumps(config))
    assert runtime_of(lighttransfer.load(out, device="cpu")).head_routing.config == cfg
    assert runtime_of(lighttransfer.load(out, device="cpu", routing_page=8)).head_routing.config.page == 8
    off = runtime_of(lighttransfer.load(out, device="cpu", routing_guard="none")).head_routing.config
    assert off.guard == "none" and off.page is None and off.tau == 0.1
    other = runtime_of(lighttransfer.load(out, device="cpu", routing_guard="heads",
                                          routing_full_heads={1: [True, False]})).head_routing.config
    assert other.guard == "heads" and other.page is None and other.full_masks == {1: [True, False]}
    fresh = runtime_of(lighttransfer.load(tiny_model_dir, device="cpu", head_routing="qada", routing_tau=0.2,
                                          routing_guard="pages")).head_routing.config
    assert fresh.guard == "pages" and fresh.page_size == 64


@pytest.mark.parametrize("kwargs,match", [
    (dict(head_routing="qada", routing_tau=0.1, routing_guard="bloom"), "routing_guard must be one of"),
    (dict(head_routing="qada", routing_tau=0.1, routing_guard="pages", routing_page=0), "routing_page must be"),
    (dict(head_routing="qada", routing_tau=0.1, routing_page=16), "routing_page needs routing_guard"),
    (dict(head_routing="oracle", routing_tau=0.1, routing_guard="pages"), "routing_guard 'pages' applies to"),
], ids=["unknown", "page-0", "page-without-guard", "oracle"])
def test_guard_options_fail_with_one_line_naming_the_option(tiny_model_dir, kwargs, match):
    import lighttransfer

    with pytest.raises(LightTransferError, match=match) as err:
        lighttransfer.load(tiny_model_dir, device="cpu", **kwargs)
    assert "\n" not in str(err.value)
    with pytest.raises(LightTransferError, match="routing_guard needs head_routing"):
        resolve_head_routing(None, mode=None, guard="pages")  # a guard with nothing to guard


def test_heads_guard_keeps_its_heads_full_and_qada_decides_the_rest():
    """tau 1 routes every unguarded head local: the heads guard then equals static routing with the complement of
    its masks, output for output; the guarded heads never go local, whatever tau."""
    full = {0: [True, False], 2: [False, True]}
    ids = ids_of(2, 30, seed=4)
    guarded = routed(HeadRoutingConfig(mode="qada", tau=1.0, guard="heads", full_masks=full))
    local = {layer: [not f for f in full.get(layer, [False, False])] for layer in range(4)}
    static = routed(HeadRoutingConfig(mode="static", local_masks=local))
    torch.testing.assert_close(decode_logits(guarded, ids, 10), decode_logits(static, ids, 10), rtol=0, atol=0)
    assert head_routing_stats(guarded).local_share_by_layer() == {0: 0.5, 1: 1.0, 2: 0.5, 3: 1.0}
    plain = routed(HeadRoutingConfig(mode="qada", tau=1.0))
    decode_logits(plain, ids, 10)
    assert head_routing_stats(plain).local_share() == 1.0  # without the guard every head goes local


def test_calibration_with_the_heads_guard_counts_its_heads_as_never_local():
    full = {layer: [True, False] for layer in range(4)}  # half the KV heads always full
    model = routed(HeadRoutingConfig(mode="random", share=0.0))
    samples = [ids_of(1, 48, seed=s)[0] for s in range(3)]
    dist = far_share_distribution(model, samples, last=16, guard="heads", full_masks=full)
    assert all(torch.isinf(v[:, 0]).all() and torch.isfinite(v[:, 1]).all() for v in dist.values())
    for share, expect in ((0.25, 0.25), (0.9, 0.5)):  # 0.9 is out of reach: every unguarded head goes local
        cfg = calibrate_head_routing(model, samples, share=share, last=16, guard="heads", full_masks=full)
        assert cfg.guard == "heads" and cfg.full_masks == full
        enable_hybrid(model, runtime_of(model).layout, head_routing=cfg)
        runtime_of(model).select_chunks = True
        with torch.no_grad():
            for ids in samples:
                out = model(ids[None, :-16], use_cache=True)
                model(ids[None, -16:], use_cache=True, **{cache_keyword(model): output_cache(out)})
        assert abs(head_routing_stats(model).local_share() - expect) < 0.05, share


def test_heads_guard_options_round_trip_and_fail_with_one_line(tiny_model_dir):
    import lighttransfer

    cfg = HeadRoutingConfig(mode="qada", tau=0.1, guard="heads", full_masks={1: [True, False]})
    d = cfg.to_dict()
    assert d["guard"] == "heads" and d["full_masks"] == {"1": [True, False]}
    assert HeadRoutingConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert "full_masks" not in HeadRoutingConfig(mode="qada", tau=0.1).to_dict()  # older readers unaffected
    assert "1 KV heads always full" in cfg.describe()
    loaded = runtime_of(lighttransfer.load(tiny_model_dir, device="cpu", head_routing="qada", routing_tau=0.2,
                                           routing_guard="heads", routing_full_heads={2: [False, True]}))
    assert loaded.head_routing.config.full_masks == {2: [False, True]}
    for kwargs, match in ((dict(routing_guard="heads"), "needs routing_full_heads"),
                          (dict(routing_full_heads={0: [True, False]}), "needs routing_guard='heads'"),
                          (dict(routing_guard="heads", routing_full_heads={0: [False, False]}),
                           "at least one KV head")):
        with pytest.raises(LightTransferError, match=match) as err:
            lighttransfer.load(tiny_model_dir, device="cpu", head_routing="qada", routing_tau=0.1, **kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(LightTransferError, match="routing_full_heads needs head_routing"):
        resolve_head_routing(None, mode=None, full_masks={0: [True, False]})


def test_convert_stores_the_guard(tiny_model_dir, tmp_path, capsys):
    from conftest import run_cli

    out = tmp_path / "hybrid"
    code, stdout, err = run_cli(["convert", str(tiny_model_dir), "--layers", "1", "--window", "8", "--sink", "2",
                                 "--out", str(out), "--head-routing", "qada", "--routing-tau", "0.6",
                                 "--routing-guard", "pages", "--routing-page", "16"], capsys)
    assert code == 0, err
    assert "page guard (P=16)" in stdout
    block = json.loads((out / "config.json").read_text())["lighttransfer"]
    assert block["head_routing"]["guard"] == "pages" and block["head_routing"]["page"] == 16
    code, _, err = run_cli(["convert", str(tiny_model_dir), "--layers", "1", "--out", str(tmp_path / "bad"),
                            "--routing-guard", "pages"], capsys)
    assert code != 0 and "--routing-guard" in err and "Traceback" not in err
    code, _, err = run_cli(["convert", str(tiny_model_dir), "--layers", "1", "--out", str(tmp_path / "bad"),
                            "--head-routing", "qada", "--routing-tau", "0.1", "--routing-full-share", "0.5"], capsys)
    assert code != 0 and "--routing-full-share needs --routing-guard heads" in err and "Traceback" not in err
    code, _, err = run_cli(["convert", str(tiny_model_dir), "--layers", "1", "--out", str(tmp_path / "bad"),
                            "--head-routing", "qada", "--routing-tau", "0.1", "--routing-guard", "heads"], capsys)
    assert code != 0 and "pass --report" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def test_share_threshold_keeps_ties_under_the_target():
    """A tie across the target steps down: shares saturated at 1.0 (the pages guard's, often) never give tau = 1,
    which would route every decision local."""
    from lighttransfer.runtime.head_routing_calibration import share_threshold

    assert share_threshold(torch.tensor([0.1, 0.2, 0.3, 0.4]), 0.5) == pytest.approx(0.2)
    saturated = torch.tensor([0.1, 0.2, 1.0, 1.0, 1.0, 1.0])
    tau = share_threshold(saturated, 0.5)
    assert tau == pytest.approx(0.2) and (saturated <= tau).float().mean() <= 0.5
    assert share_threshold(torch.ones(4), 0.5) == 0.0  # nothing can go local at the target without all going
    assert share_threshold(torch.tensor([0.3, 0.3, 0.5]), 0.0) == 0.0
