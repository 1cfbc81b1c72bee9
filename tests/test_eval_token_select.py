"""Evaluation rows with TokenSelect: built from the names, the masked reference and the runtime agree, the
Selection Cache counts reach the result, and ``eval --rows ...,tokenselect,lighttransfer+tokenselect`` runs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model, run_cli
from lighttransfer.evaluation.backends import MaskedBackend, RuntimeBackend
from lighttransfer.evaluation.perplexity import perplexity, plan_windows
from lighttransfer.evaluation.rows import DEFAULT_ROWS, EvalRow, standard_rows
from lighttransfer.hybrid_format import TokenSelectConfig

SELECT = TokenSelectConfig(k=6, init=2, local=8, reuse=0.9)


def test_rows_are_built_by_name_and_not_by_default():
    rows = {r.name: r for r in standard_rows(lazy_ratios=[0.9, 0.2, 0.8, 0.1], ratio=0.5, num_kv_heads=2, sink=2,
                                             window=16, names=["original", "tokenselect", "lighttransfer",
                                                               "lighttransfer+tokenselect"], selection=SELECT)}
    assert "tokenselect" not in DEFAULT_ROWS and "lighttransfer+tokenselect" not in DEFAULT_ROWS
    assert rows["tokenselect"].streaming_layers == [] and rows["tokenselect"].selection == SELECT
    assert not rows["tokenselect"].is_dense and rows["original"].is_dense
    assert rows["lighttransfer+tokenselect"].streaming_layers == rows["lighttransfer"].streaming_layers == [0, 2]
    assert rows["lighttransfer+tokenselect"].selection == SELECT and rows["lighttransfer"].selection is None
    assert rows["tokenselect"].to_dict()["selection"] == {"k": 6, "init": 2, "local": 8, "reuse": 0.9,
                                                         "reuse_max_age": 64, "reuse_against": "anchor"}
    assert rows["tokenselect"].kv_fraction(1000) == 1.0  # TokenSelect reads less, it keeps everything


# the Quest-like page-bound baseline (the quest rows) goes through the same selection path
PAGED = TokenSelectConfig(k=16, init=2, local=8, reuse=0.9, score="pages", page=4)


@pytest.mark.parametrize("selection", [SELECT, PAGED], ids=["tokens", "pages"])
@pytest.mark.parametrize("layers", [(), (0, 2)], ids=["alone", "with-lighttransfer"])
def test_masked_reference_matches_runtime(layers, selection):
    model = make_tiny_model("llama")
    row = EvalRow.of("ts", num_layers=4, num_kv_heads=2, streaming_layers=list(layers), sink=2, window=16,
                     selection=selection)
    ids = torch.randint(0, 256, (500,), generator=torch.Generator().manual_seed(1))
    windows = plan_windows(500, length=120, stride=40, min_context=selection.budget, max_windows=2)
    masked, runtime = MaskedBackend(model), RuntimeBackend(model)
    a = perplexity(lambda: masked.sequence(row), ids, windows)
    b = perplexity(lambda: runtime.sequence(row), ids, windows)
    sa, sb = masked.selection_stats(), runtime.selection_stats()
    runtime.release(row)
    assert a["nll"] == pytest.approx(b["nll"], rel=1e-5)
    assert sa == sb and sa["lookups"] > 0
    dense_layers = EvalRow.of("no-select", num_layers=4, num_kv_heads=2, streaming_layers=list(layers), sink=2,
                              window=16) if layers else EvalRow.of("original", num_layers=4, num_kv_heads=2)
    c = perplexity(lambda: masked.sequence(dense_layers), ids, windows)
    assert a["nll"] != pytest.approx(c["nll"], rel=1e-7)


def test_eval_cli_runs_the_tokenselect_rows(tmp_path, capsys, long_text, monkeypatch):
    from test_eval import eval_inputs

    model_dir, text = eval_inputs(tmp_path, long_text, monkeypatch)
    out = tmp_path / "res.json"
    code, _, err = run_cli([
        "eval", "--baseline", str(model_dir), "--text", str(text), "--report", "r.json", "--lengths", "96",
        "--windows", "1", "--passkey-lengths", "256", "--passkey-depths", "2", "--passkey-trials", "1",
        "--sink", "2", "--window", "16", "--ratio", "0.5",
        "--rows", "original,tokenselect,lighttransfer,lighttransfer+tokenselect",
        "--select-k", "6", "--select-init", "2", "--select-local", "8", "--select-reuse", "0.5",
        "--select-reuse-max-age", "5",
        "--device", "cpu", "--out", str(out), "-q"], capsys)
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["original", "tokenselect", "lighttransfer", "lighttransfer+tokenselect"]
    for name in ("tokenselect", "lighttransfer+tokenselect"):
        cache = rows[name]["selection_cache"]
        assert cache["lookups"] > 0 and 0 <= cache["hit_rate"] <= 1
        assert rows[name]["selection"] == {"k": 6, "init": 2, "local": 8, "reuse": 0.5, "reuse_max_age": 5,
                                           "reuse_against": "anchor"}
    assert "selection_cache" not in rows["lighttransfer"]
    assert "Selection Cache:" in (tmp_path / "res.md").read_text()
    code, _, err = run_cli([
        "eval", "--baseline", str(model_dir), "--text", str(text), "--rows", "tokenselect",
        "--select-reuse-max-age", "0", "--device", "cpu", "--out", str(tmp_path / "bad.json"), "-q"], capsys)
    assert code != 0 and "reuse_max_age" in err and "Traceback" not in err


def test_tokenselect_alone_on_a_plain_model_needs_no_report(tmp_path, capsys, long_text, monkeypatch):
    from test_eval import eval_inputs

    model_dir, text = eval_inputs(tmp_path, long_text, monkeypatch)
    common = ["eval", "--baseline", str(model_dir), "--text", str(text), "--lengths", "96", "--windows", "1",
              "--suite", "perplexity", "--select-k", "6", "--select-init", "2", "--select-local", "8",
              "--device", "cpu", "-q"]
    out = tmp_path / "alone.json"
    code, _, err = run_cli([*common, "--rows", "original,tokenselect", "--out", str(out)], capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert [r["name"] for r in result["rows"]] == ["original", "tokenselect"]
    assert all(r["streaming_layers"] == [] for r in result["rows"]) and result["ratio"] == 0.0
    # a row that picks layers by their lazy ratios still asks for the report, in one line
    code, _, err = run_cli([*common, "--rows", "original,lighttransfer", "--out", str(tmp_path / "r.json")], capsys)
    assert code != 0 and "--report" in err and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()
