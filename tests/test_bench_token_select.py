"""``benchmark(decode="tokenselect")`` and ``lighttransfer bench --decode tokenselect`` on a tiny model: the
TokenSelect rows beside every runtime variant (eager and static steps, batch 1 and the largest batch), the forced
all-miss / all-hit Selection Cache and the realised hit counts, the bytes a TokenSelect step reads, the
interpolation to a hit share, the greedy tokens of a budget covering every key equal to dense decoding's, and
one-line errors for bad option combinations."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from lighttransfer.bench.speed import GRAPHED, RUNTIME_DENSE, BenchResult, benchmark, markdown_bench
from lighttransfer.bench.token_select_rows import (
    ALL_HIT,
    ALL_MISS,
    forced_hits,
    full_layer_read_bytes,
    interpolated_ms,
    row_variant,
)
from lighttransfer.errors import LightTransferError
from lighttransfer.hybrid_format import TokenSelectConfig
from lighttransfer.kernels.switch import use_reference

# tiny Llama: 4 layers, 2 KV heads of 16 dims, fp32; the hybrid streams 2 of them
FULL_LAYERS = {RUNTIME_DENSE: 4, "ratio 0.5": 2}
ROW = 2 * 16 * 4  # bytes of one token's keys (or values) in one layer
SELECT = dict(select_k=8, select_init=2, select_local=8, select_reuse_max_age=2)  # a reuse cycle of 3 steps
STEPS, WARMUP = 2, 3


def _bench(model_dir, out=None, **kwargs):
    # timing is not under test: the PyTorch references avoid Triton's (slow) CPU interpreter
    with use_reference():
        return benchmark(baseline=str(model_dir), contexts=[64], ratios=[0.5], memory_budget_gb=0.002,
                         max_batch=3, sink=2, window=16, device="cpu", dtype="float32", cuda_graphs=True,
                         out=out, **{"decode_steps": STEPS, **kwargs})


@pytest.fixture(scope="module")
def ts_result(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-ts") / "b.json"
    return _bench(tiny_model_dir, out, decode="tokenselect", select_hit_share=0.7, **SELECT), out


def _rows(result):
    return {(p["variant"], p["largest_batch"]): p for p in result.points}


def test_every_runtime_variant_gets_tokenselect_rows_eager_and_graphed(ts_result):
    result, _ = ts_result
    rows = _rows(result)
    for base in FULL_LAYERS:
        for largest in (False, True):
            dense = rows[(base, largest)]
            for setting in (ALL_MISS, ALL_HIT):
                for suffix in ("", GRAPHED):
                    p = rows[(row_variant(base, setting) + suffix, largest)]
                    assert (p["decode"], p["select_setting"], p["batch"]) == ("tokenselect", setting, dense["batch"])
                    assert p["decode_path"] == "eager" if not suffix else p["decode_path"].startswith("eager (CUDA")
    assert not [p for p in result.points if p["variant"].startswith("original") and p["decode"] != "dense"]
    assert max(p["batch"] for p in result.points) > 1
    assert result.token_select["select_k"] == 8 and result.select_hit_shares == [0.0, 0.5, 0.7, 0.9]


def test_forced_settings_give_the_expected_hit_counts(ts_result):
    """Lookups: one per full layer, sequence and timed step. All miss: no hit. All hit from a cold Selection
    Cache with reuse_max_age 2: step i misses iff i % 3 == 0, so of the timed steps 3 and 4 only step 4 hits."""
    result, _ = ts_result
    assert forced_hits(ALL_HIT, first_step=WARMUP, steps=STEPS, max_age=2) == 1
    for p in result.points:
        if p["decode"] != "tokenselect":
            assert p["select_lookups"] is None
            continue
        lookups = p["batch"] * FULL_LAYERS[p["variant"].split(" + ")[0]] * STEPS
        assert p["select_lookups"] == lookups
        assert p["select_hits"] == (0 if p["select_setting"] == ALL_MISS else lookups // 2)


def test_forced_hits_are_bounded_by_the_age_limit():
    assert forced_hits(ALL_HIT, first_step=3, steps=48, max_age=64) == 48  # steps 3..50: no rescore
    assert forced_hits(ALL_HIT, first_step=3, steps=64, max_age=64) == 63  # step 65 rescores
    assert forced_hits(ALL_HIT, first_step=0, steps=130, max_age=64) == 128  # steps 0 and 65
    assert forced_hits(ALL_MISS, first_step=3, steps=48, max_age=64) == 0


def test_forced_reuse_decides_hits_whatever_the_queries():
    """The bench's knob on the runtime: forced similar hits even for an opposite query, forced dissimilar misses
    even for the same query; the age bound holds either way."""
    from lighttransfer.runtime.token_select import SelectionState, SelectionStats, token_select_attention

    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 2, 40, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g)
    q = torch.randn(2, 4, 1, 16, generator=g)
    for force, second, want in ((True, -q, 2), (False, q, 0)):
        config = TokenSelectConfig(k=6, init=2, local=4, reuse=0.9, force_reuse=force)
        state, stats = SelectionState(), SelectionStats()
        token_select_attention(q, k[:, :, :39], v[:, :, :39], config=config, state=state, stats=stats,
                               kv_start=None, scale=None)
        token_select_attention(second, k, v, config=config, state=state, stats=stats, kv_start=None, scale=None)
        assert (stats.lookups, stats.hits) == (4, want)
    with pytest.raises(LightTransferError, match="force_reuse needs the Selection Cache"):
        TokenSelectConfig(reuse=1.0, force_reuse=True)
    assert "force_reuse" not in TokenSelectConfig(force_reuse=True).to_fields()


def test_tokenselect_rows_count_the_bytes_they_must_read(ts_result, tiny_model_dir):
    """Runtime dense at batch 1, the eager all-miss row (the third row on its cache: 64 + 3 x 5 keys at its end):
    per full layer, the listed 2 + 8 + 8 keys' K/V rows and int32 indices, and on a miss the 69 candidates' keys;
    a hit lists (2 + 1) / 2 ~ 2 more keys on average and scores none."""
    result, _ = ts_result
    weights = result.weight_bytes_per_step
    p = _rows(result)[(row_variant(RUNTIME_DENSE, ALL_MISS), False)]
    n = 64 + 3 * (WARMUP + STEPS)
    assert p["select_bytes_miss"] == weights + 4 * (18 * (2 * ROW + 4) + (n - 10) * ROW)
    assert p["select_bytes_hit"] == weights + 4 * (20 * (2 * ROW + 4))
    assert p["bytes_per_step"] == p["select_bytes_miss"]  # no hit in the all-miss row
    hit = _rows(result)[(row_variant(RUNTIME_DENSE, ALL_HIT), False)]
    assert hit["bytes_per_step"] == round((hit["select_bytes_miss"] + hit["select_bytes_hit"]) / 2)  # 50% hits
    # a budget covering every key reads them all; and the streaming layers' window counts whole (ratio 0.5)
    config = TokenSelectConfig(k=8, init=2, local=8)
    assert full_layer_read_bytes(18, key_row=ROW, value_row=ROW, config=config, hit=False) == 18 * 2 * ROW
    hybrid = _rows(result)[(row_variant("ratio 0.5", ALL_MISS), False)]
    streaming = 2 * (2 + 16) * 2 * ROW
    assert hybrid["select_bytes_miss"] == weights + streaming + 2 * (18 * (2 * ROW + 4) + (n - 10) * ROW)


def test_the_summary_interpolates_between_the_realised_hit_shares(ts_result):
    result, out = ts_result
    summary = {(e["variant"], e["largest_batch"]): e for e in result.selection_summary}
    assert len(summary) == 2 * 2 * 2  # two variants, batch 1 and largest, eager and graphed
    entry = summary[("ratio 0.5" + GRAPHED, True)]
    rows = _rows(result)
    miss, hit = rows[(row_variant("ratio 0.5", ALL_MISS) + GRAPHED, True)], \
        rows[(row_variant("ratio 0.5", ALL_HIT) + GRAPHED, True)]
    dense = rows[("ratio 0.5" + GRAPHED, True)]
    shares = {s["hit_share"]: s for s in entry["shares"]}
    assert shares[0.0]["ms_per_step"] == pytest.approx(miss["decode_ms_per_step"])
    assert shares[0.5]["ms_per_step"] == pytest.approx(hit["decode_ms_per_step"])  # the realised share: 1 in 2
    assert shares[0.9]["ms_per_step"] == pytest.approx(interpolated_ms(miss, hit, 0.9))
    assert shares[0.7]["x_dense_decode"] == pytest.approx(dense["decode_ms_per_step"] / shares[0.7]["ms_per_step"])
    # bytes at a share: the all-miss row's two ends (counted over its own cache length)
    assert shares[0.5]["bytes_per_step"] == round((miss["select_bytes_miss"] + miss["select_bytes_hit"]) / 2)
    md = out.with_suffix(".md").read_text()
    assert "## TokenSelect decode against the same variant decoding densely" in md
    assert "| ratio 0.5, cuda graph | 64 |" in md and "70% hits" in md


def test_results_round_trip_and_version_1_files_still_read(ts_result, tmp_path):
    result, out = ts_result
    again = BenchResult.load(out)
    assert again.schema_version == 2 and again.selection_summary == json.loads(out.read_text())["selection_summary"]
    old = json.loads(out.read_text())
    for key in ("token_select", "select_hit_shares", "selection_summary"):
        old.pop(key)
    old["schema_version"], old["points"] = 1, []
    (tmp_path / "v1.json").write_text(json.dumps(old))
    v1 = BenchResult.load(tmp_path / "v1.json")
    assert v1.token_select is None and v1.schema_version == 2
    assert "TokenSelect" not in markdown_bench(v1)


def test_a_budget_covering_every_key_gives_the_dense_rows_tokens(tiny_model_dir):
    """Every row that continues a cache continues its greedy generation. With TokenSelect's budget covering every
    key, the six rows of a cache (eager and graphed, dense, all miss, all hit; one step each) give the tokens the
    two dense rows of a dense-only run give over as many steps (4 x 6 = 2 x (3 + 9)), at batch 1 and at the
    largest batch, for the runtime's dense path and the hybrid."""
    covered = _bench(tiny_model_dir, decode="tokenselect", decode_steps=1, select_k=4096, select_init=2,
                     select_local=8)
    dense = _bench(tiny_model_dir, decode_steps=9)

    def streams(result):
        got = {}
        for p in result.points:
            if p["variant"].startswith("original"):
                continue
            base = p["variant"].split(" + ")[0].removesuffix(GRAPHED)
            got.setdefault((base, p["largest_batch"]), []).extend(p["tokens"])
        return got

    a, b = streams(covered), streams(dense)
    assert a.keys() == b.keys() and len(a) == 4
    for key in a:
        assert len(a[key]) == 24 and a[key] == b[key], key
    # the dynamic steps attended densely (nothing to select), the static ones listed every key
    ts_rows = [p for p in covered.points if p["decode"] == "tokenselect"]
    assert all(p["select_lookups"] == 0 for p in ts_rows if not p["variant"].endswith(GRAPHED))
    assert all(p["select_lookups"] > 0 for p in ts_rows if p["variant"].endswith(GRAPHED))


def test_bench_cli_with_tokenselect_and_no_selection_cache(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    with use_reference():
        code, stdout, err = run_cli(["bench", "--baseline", str(tiny_model_dir), "--context", "64", "--ratios", "0.5",
                                     "--decode-steps", "1", "--sink", "2", "--window", "16", "--device", "cpu",
                                     "--no-original", "--decode", "tokenselect", "--select-k", "8",
                                     "--select-init", "2", "--select-local", "8", "--select-reuse", "1",
                                     "--out", str(out)], capsys)
    assert code == 0, err
    data = json.loads(out.read_text())
    variants = {p["variant"] for p in data["points"]}
    assert variants == {RUNTIME_DENSE, "ratio 0.5", row_variant(RUNTIME_DENSE, "no cache"),
                        row_variant("ratio 0.5", "no cache")}
    assert all(p["select_hits"] == 0 for p in data["points"] if p["decode"] == "tokenselect")
    assert "no Selection Cache" in stdout and "+ tokenselect (no cache)" in stdout


@pytest.mark.parametrize("args, match", [
    (["--select-k", "8"], "--select-k sets the TokenSelect rows; add --decode tokenselect"),
    (["--select-hit-share", "0.5"], "--select-hit-share sets the TokenSelect rows"),
    (["--decode", "tokenselect", "--select-hit-share", "1.5"], "must be a share of hits in [0, 1]"),
    (["--decode", "tokenselect", "--select-reuse", "1", "--select-hit-share", "0.5"], "needs the Selection Cache"),
    (["--decode", "tokenselect", "--select-reuse", "1.5"], "select_reuse must be a cosine threshold"),
    (["--decode", "tokenselect", "--select-k", "0"], "select_k must be a whole number >= 1"),
    (["--compiled-baseline", "--no-original"], "drop --no-original"),
], ids=["k-without-tokenselect", "share-without-tokenselect", "share-out-of-range", "share-without-cache",
        "reuse-out-of-range", "k-zero", "compiled-without-original"])
def test_bad_tokenselect_options_are_one_line(tiny_model_dir, tmp_path, capsys, args, match):
    argv = ["bench", "--baseline", str(tiny_model_dir), "--context", "64", "--device", "cpu",
            "--out", str(tmp_path / "r.json"), *args]
    code, _, err = run_cli(argv, capsys)
    assert code != 0 and match in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1
    assert not (tmp_path / "r.json").exists()


def test_the_e2e_script_asks_for_the_target_rows_and_writes_the_verdict(ts_result, tmp_path, monkeypatch):
    """The GPU script, with the benchmark itself replaced by the tiny run: the 8B shape at 64k and 128k in a 130 GB
    budget, TokenSelect and CUDA graphs on, stock transformers off; the verdict table has the hybrid's graphed rows
    at batch 1 and the largest batch, the speedups those of the summary."""
    import importlib.util
    import sys
    from pathlib import Path

    import lighttransfer.bench.speed as speed
    from lighttransfer.bench.shaped_model import SHAPES

    result, _ = ts_result
    asked = {}
    monkeypatch.setattr(speed, "benchmark", lambda **kw: asked.update(kw) or result)
    path = Path(__file__).resolve().parents[1] / "bench" / "scripts" / "tokenselect_e2e.py"
    spec = importlib.util.spec_from_file_location("tokenselect_e2e", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(sys, "argv", ["tokenselect_e2e.py", str(tmp_path)])
    script.main()
    assert asked["contexts"] == (65536, 131072) and asked["memory_budget_gb"] == 130
    assert (asked["baseline"], asked["decode"], asked["cuda_graphs"], asked["original"]) == \
        ("llama3-8b-shaped", "tokenselect", True, False)
    assert SHAPES["llama3-8b-shaped"]["max_position_embeddings"] >= 131072 + 2048
    verdict = (tmp_path / "tokenselect_e2e_target.md").read_text().splitlines()
    rows = [line for line in verdict if line.startswith("| 64 |")]
    assert len(rows) == 2 and "(max)" in rows[1]
    entry = next(e for e in result.selection_summary if e["variant"] == "ratio 0.5" + GRAPHED
                 and not e["largest_batch"])
    assert f"{entry['shares'][0]['x_dense_decode']:.2f}x" in rows[0]
