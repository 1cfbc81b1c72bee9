"""The TokenSelect benchmark scripts: the kernel benchmark end to end at a tiny CPU shape (every part checked
against the references before timing), and the Selection Cache sweep's bookkeeping."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "bench" / "scripts"


def _script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_bench_times_every_part_after_checking_it(monkeypatch):
    if not os.environ.get("TRITON_INTERPRET"):
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1, set by conftest on CPU machines)")
    bench = _script("tokenselect_kernel_bench")
    monkeypatch.setattr(bench, "HEADS", 4)
    monkeypatch.setattr(bench, "KV_HEADS", 2)
    monkeypatch.setattr(bench, "HEAD_DIM", 16)
    import lighttransfer.runtime.token_select as ts

    monkeypatch.setattr(ts, "KERNELS_ON_CPU", False)  # bench_batch turns it on; monkeypatch puts it back
    row = bench.bench_batch(2, n_keys=90, k_select=8, init=4, local=8, dtype=torch.float32, device="cpu",
                            graph=False, rounds=1, tolerance=1e-4)
    assert set(row["us_eager"]) == set(bench.PARTS) and row["selected"] == 20
    assert row["errors"]["votes"] < 1e-5 and row["errors"]["runtime_miss_step"] < 1e-5
    assert row["errors"]["cached_step_hit"] < 1e-5 and row["errors"]["cached_step_miss"] < 1e-5
    # the lookup as one kernel and as separate torch ops: the same steps
    assert row["errors"]["cached_step_hit_unfused"] == 0 and row["errors"]["cached_step_miss_unfused"] == 0
    # the radix select lists the same keys in another order: the attention's sums round differently
    assert row["errors"]["cached_step_hit_radix"] == 0 and row["errors"]["cached_step_miss_radix"] < 1e-6
    # the timed calls: every one of the hit step's lookups hit, none of the miss step's
    counts = row["cached_step_counts"]
    assert counts["hit"]["hits"] == counts["hit"]["lookups"] > 0
    assert counts["miss"]["hits"] == 0 < counts["miss"]["lookups"]
    assert row["bytes"]["votes"] < row["bytes"]["votes_two_pass"]
    bench.summarize(row, None)
    md = bench.to_markdown({"environment": {}, "autotune": False, "shape": {"dtype": "float32"}, "rows": [row]})
    assert "| 2 | 90 | 20 |" in md


def _patched_sweep(monkeypatch, rows_of):
    """The sweep script with its model lookups and ``evaluate`` replaced: ``rows_of(rows)`` gives a fake
    evaluation's result rows for the rows asked."""
    sweep_script = _script("tokenselect_reuse_sweep")
    from types import SimpleNamespace

    import lighttransfer.architecture as architecture
    import lighttransfer.evaluation.eval_suite as eval_suite
    import lighttransfer.loading as loading
    from lighttransfer.evaluation.eval_suite import EvalResult

    def fake_evaluate(*, rows, **kw):
        return EvalResult(model_id="m", fingerprint="f", ratio=0.0, sink=4, window=1020, lengths=[2048], strides={},
                          passkey_lengths=[2048], passkey_depths=[0.5], passkey_trials=1, text="t", backend="masked",
                          rows=rows_of(rows))

    monkeypatch.setattr(eval_suite, "evaluate", fake_evaluate)
    monkeypatch.setattr(loading, "load_config", lambda source: None)
    monkeypatch.setattr(loading, "resolve_model_source", lambda spec: spec)
    monkeypatch.setattr(architecture, "model_shape", lambda config: SimpleNamespace(num_layers=4, num_kv_heads=2))
    return sweep_script


def test_reuse_sweep_scores_the_original_once_and_compares_with_no_cache(monkeypatch):
    calls = []

    def rows_of(rows):
        names = [r.name for r in rows]
        theta = next(r.selection.reuse for r in rows if r.name == "tokenselect")
        calls.append((names, theta))
        out = []
        if "original" in names:
            out.append({"name": "original", "perplexity": {2048: {"ppl": 10.0}}, "passkey": {"accuracy": 1.0, "n": 5}})
        out.append({"name": "tokenselect", "perplexity": {2048: {"ppl": 10.0 + (1 - theta)}},
                    "passkey": {"accuracy": 0.8 if theta < 0.8 else 1.0, "n": 5},
                    "selection_cache": {"hits": int(100 * (1 - theta)), "lookups": 100, "dense": 0,
                                        "hit_rate": 1 - theta}})
        return out

    sweep_script = _patched_sweep(monkeypatch, rows_of)
    saved = []
    result = sweep_script.sweep(baseline="m", text="t", text_lines=None, lengths=[2048], thetas=[0.5, 1.0, 0.9],
                                k=8, init=2, local=4, windows=1, passkey_lengths=[2048], passkey_depths=5,
                                passkey_trials=1, device="cpu", dtype="float32", on_point=saved.append)
    assert calls == [(["original", "tokenselect"], 1.0), (["tokenselect"], 0.9), (["tokenselect"], 0.5)]
    # the result so far after every theta (a run cut short keeps them), complete only in the returned one
    assert [len(r["points"]) for r in saved] == [1, 2, 3] and not any(r["complete"] for r in saved)
    assert result["complete"] and saved[1]["points"][1]["vs_no_cache"] is not None
    assert "Partial" in sweep_script.to_markdown(saved[0]) and "Partial" not in sweep_script.to_markdown(result)
    by = {p["theta"]: p for p in result["points"]}
    assert by[1.0]["vs_no_cache"]["perplexity_percent"]["2048"] == 0.0
    assert by[0.5]["vs_no_cache"]["perplexity_percent"]["2048"] == pytest.approx(5.0)
    assert by[0.5]["vs_original"]["passkey_points"] == pytest.approx(-20.0)
    md = sweep_script.to_markdown(result)
    assert "| 0.5 | 50.0% | 10.500 (+5.00%, +5.00%) | 80.0 (-20.0 pt, -20.0 pt) |" in md


def test_the_reuse_sweep_runs_both_rules_side_by_side(monkeypatch):
    calls = []

    def rows_of(rows):
        calls.append([(r.name, None if r.selection is None else (r.selection.reuse, r.selection.reuse_against))
                      for r in rows])
        out = []
        for r in rows:
            entry = {"name": r.name, "perplexity": {2048: {"ppl": 10.0}}, "passkey": {"accuracy": 1.0, "n": 5}}
            if r.selection is not None:
                gain = 0.1 if r.selection.reuse_against == "previous" else 0.0
                entry["perplexity"] = {2048: {"ppl": 10.0 + (1 - r.selection.reuse) + gain}}
                entry["selection_cache"] = {"hits": 0, "lookups": 100, "dense": 0,
                                            "hit_rate": min(1.0, 1 - r.selection.reuse + gain)}
            out.append(entry)
        return out

    sweep_script = _patched_sweep(monkeypatch, rows_of)
    common = dict(baseline="m", text="t", text_lines=None, lengths=[2048], k=8, init=2, local=4, windows=1,
                  passkey_lengths=[2048], passkey_depths=5, passkey_trials=1, device="cpu", dtype="float32")
    result = sweep_script.sweep(thetas=[0.5, 1.0], against="both", **common)
    # theta 1 turns the cache off, so the rule changes nothing: one row, the no-cache reference of both
    assert calls == [[("original", None), ("tokenselect", (1.0, "anchor"))],
                     [("tokenselect", (0.5, "anchor")), ("tokenselect-prev", (0.5, "previous"))]]
    assert [(p["theta"], p["against"]) for p in result["points"]] == [(1.0, "anchor"), (0.5, "anchor"),
                                                                        (0.5, "previous")]
    assert result["against"] == "both"
    prev = result["points"][2]
    assert prev["vs_no_cache"]["perplexity_percent"]["2048"] == pytest.approx(6.0)
    md = sweep_script.to_markdown(result)
    assert "against the anchor and the previous query" in md
    assert "| 0.5 | 50.0% |" in md and "| 0.5 (previous) | 60.0% | 10.600 (+6.00%, +6.00%) |" in md
    calls.clear()
    only = sweep_script.sweep(thetas=[0.5], against="previous", **common)
    assert calls == [[("original", None), ("tokenselect-prev", (0.5, "previous"))]]
    assert [p["against"] for p in only["points"]] == ["previous"]
    with pytest.raises(ValueError, match="against"):
        sweep_script.sweep(thetas=[0.5], against="sideways", **common)


def test_the_reuse_sweep_adds_ruler_with_a_paired_interval(monkeypatch):
    asked = []

    def rows_of(rows):
        out = []
        for r in rows:
            theta = 1.0 if r.selection is None else r.selection.reuse
            lost = 2 if theta < 1.0 else 0  # the cache loses two of twenty prompts, fully
            outcomes = [0.0] * lost + [100.0] * (20 - lost)
            out.append({"name": r.name, "perplexity": {2048: {"ppl": 10.0}},
                        "passkey": {"accuracy": 1.0, "n": 2, "outcomes": [True, True]},
                        "ruler": {"average": sum(outcomes) / 20, "outcomes": outcomes},
                        "selection_cache": {"hits": 50, "lookups": 100, "dense": 0, "hit_rate": 0.5}})
        return out

    sweep_script = _patched_sweep(monkeypatch, rows_of)
    import lighttransfer.evaluation.eval_suite as eval_suite

    fake = eval_suite.evaluate
    monkeypatch.setattr(eval_suite, "evaluate", lambda **kw: asked.append(kw) or fake(**kw))
    result = sweep_script.sweep(baseline="m", text="t", text_lines=None, lengths=[2048], thetas=[1.0, 0.8], k=8,
                                init=2, local=4, windows=1, passkey_lengths=[2048], passkey_depths=5,
                                passkey_trials=1, device="cpu", dtype="float32", ruler_tasks=["niah_single_1", "cwe"],
                                ruler_samples=10)
    assert asked[0]["suite"] == ("perplexity", "passkey", "ruler") and asked[0]["ruler_tasks"] == ["niah_single_1",
                                                                                                  "cwe"]
    cached = next(p for p in result["points"] if p["theta"] == 0.8)
    assert cached["vs_no_cache"]["ruler_points"] == pytest.approx(-10.0)
    diff, low, high = cached["vs_no_cache"]["paired"]["ruler"]["points"]
    assert diff == pytest.approx(-10.0) and low == pytest.approx(-23.5, abs=0.05) and high == pytest.approx(3.5, abs=0.05)
    assert cached["vs_no_cache"]["paired"]["passkey"]["points"] == [0.0, 0.0, 0.0]
    md = sweep_script.to_markdown(result)
    assert "RULER avg (vs no cache, paired 95% CI)" in md and "| 90.0 (-10.0 pt, -23.5..+3.5) |" in md
