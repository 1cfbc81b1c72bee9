"""``select_reuse_against`` (what the Selection Cache compares a query with: the selection's anchor query or the
previous one) through the config block, ``load``, ``convert``, the CLI's shared options, the evaluation rows, the
benchmark and the reuse sweep script; the default ``anchor`` is not written, so older readers read the block."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from lighttransfer.errors import LightTransferError
from lighttransfer.hybrid_format import HybridConfig, TokenSelectConfig

BASE = HybridConfig(num_layers=4, num_kv_heads=2, streaming_layers=[1])


def test_the_block_writes_previous_and_reads_it_back():
    block = BASE.with_selection(TokenSelectConfig(k=8, reuse_against="previous")).to_dict()
    assert block["select_reuse_against"] == "previous" and block["format_version"] == 2
    again = HybridConfig.from_dict(json.loads(json.dumps(block)))
    assert again.selection.reuse_against == "previous"
    assert again.selection == TokenSelectConfig(k=8, reuse_against="previous")
    assert again.to_dict() == block
    assert "select_reuse_against" not in again.with_selection(None).to_dict()  # dense again: format 1


def test_the_default_is_not_written_and_an_absent_key_reads_as_anchor():
    default = BASE.with_selection(TokenSelectConfig(k=8)).to_dict()
    assert "select_reuse_against" not in default  # older readers read the block
    assert HybridConfig.from_dict(default).selection.reuse_against == "anchor"
    explicit = HybridConfig.from_dict({**default, "select_reuse_against": "anchor"})
    assert explicit.selection.reuse_against == "anchor" and "select_reuse_against" not in explicit.to_dict()


def test_a_bad_value_or_a_dense_block_with_it_is_refused():
    default = BASE.with_selection(TokenSelectConfig(k=8)).to_dict()
    with pytest.raises(LightTransferError, match="select_reuse_against"):
        HybridConfig.from_dict({**default, "select_reuse_against": "sideways"})
    with pytest.raises(LightTransferError, match="only meaningful"):
        HybridConfig.from_dict({**BASE.to_dict(), "select_reuse_against": "previous"})
    with pytest.raises(LightTransferError, match="select_reuse_against.*damaged|damaged.*select_reuse_against"):
        HybridConfig.from_model_config({"lighttransfer": {**default, "select_reuse_against": 1}})


def test_load_and_convert_carry_it(tiny_model_dir, tmp_path, capsys):
    import lighttransfer
    from lighttransfer.runtime import runtime_of

    model = lighttransfer.load(tiny_model_dir, device="cpu", decode="tokenselect", select_reuse_against="previous")
    assert runtime_of(model).layout.selection.reuse_against == "previous"
    with pytest.raises(LightTransferError, match="select_reuse_against"):
        lighttransfer.load(tiny_model_dir, device="cpu", decode="tokenselect", select_reuse_against="next")
    out = tmp_path / "hybrid"
    code, _, err = run_cli(["convert", str(tiny_model_dir), "--layers", "1", "--out", str(out), "--decode",
                            "tokenselect", "--select-k", "16", "--select-reuse-against", "previous"], capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["lighttransfer"]["select_reuse_against"] == "previous"
    assert runtime_of(lighttransfer.load(out, device="cpu")).layout.selection.reuse_against == "previous"
    # the checkpoint's rule, overridden at load time
    again = lighttransfer.load(out, device="cpu", select_reuse_against="anchor")
    assert runtime_of(again).layout.selection.reuse_against == "anchor"


@pytest.mark.parametrize("command", ["convert", "generate", "eval", "bench"])
def test_every_command_with_select_options_offers_it(command, capsys):
    code, out, _ = run_cli([command, "--help"], capsys)
    assert code == 0 and "--select-reuse-against" in out and "[anchor|previous]" in out


def test_the_cli_refuses_an_unknown_rule(tiny_model_dir, tmp_path, capsys):
    code, _, err = run_cli(["convert", str(tiny_model_dir), "--layers", "1", "--out", str(tmp_path / "h"),
                            "--decode", "tokenselect", "--select-reuse-against", "next"], capsys)
    assert code == 2 and "--select-reuse-against" in err and not (tmp_path / "h").exists()


def test_the_evaluation_rows_and_the_benchmark_carry_it(tmp_path):
    from lighttransfer.bench.speed import BenchResult, benchmark, markdown_bench
    from lighttransfer.evaluation.rows import standard_rows

    rows = standard_rows(lazy_ratios=[0.9, 0.2, 0.8, 0.1], ratio=0.5, num_kv_heads=2, sink=2, window=16,
                         names=["tokenselect"], selection=TokenSelectConfig(k=6, reuse_against="previous"))
    assert rows[0].to_dict()["selection"]["reuse_against"] == "previous"
    with pytest.raises(LightTransferError, match="--select-reuse-against sets the TokenSelect rows"):
        benchmark(baseline="unused", contexts=[64], ratios=[0.5], decode="dense", select_reuse_against="previous",
                  out=tmp_path / "r.json")
    # results written before the setting existed still render (their rows compared with the anchor)
    fields = TokenSelectConfig(k=8).to_fields()
    fields.pop("select_reuse_against")
    old = BenchResult(model_id="m", contexts=[64], ratios=[0.5], sink=2, window=16, decode_steps=1,
                      memory_budget_bytes=None, dtype="float32", token_select=fields)
    assert "| variant |" in markdown_bench(old)

