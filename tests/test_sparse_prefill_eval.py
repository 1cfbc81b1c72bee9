"""The sparse-prefill eval rows: same prompts as the other rows, run by the runtime, density reported."""

from __future__ import annotations

import pytest
from lighttransfer.evaluation.rows import DEFAULT_ROWS, SPARSE_PREFILL_ROWS, standard_rows
from lighttransfer.hybrid_format import SparsePrefillConfig
from test_eval import _stub_eval, report_file, text_file, tiny_dir_with_tokenizer  # noqa: F401 (fixtures)


def test_sparse_rows_are_asked_for_by_name_and_carry_their_settings():
    assert not set(SPARSE_PREFILL_ROWS) & set(DEFAULT_ROWS)
    cfg = SparsePrefillConfig(method="vslash", alpha=0.9, min_len=32, block_q=16, block_k=16)
    rows = standard_rows(lazy_ratios=[0.9, 0.2, 0.8, 0.1], ratio=0.5, num_kv_heads=2, sink=2, window=16,
                         names=["lighttransfer", *SPARSE_PREFILL_ROWS], sparse_prefill=cfg)
    lt, sp, both = rows
    assert sp.layout.is_dense and not sp.is_dense and sp.sparse_prefill == cfg and sp.kv_fraction(100) == 1.0
    assert both.streaming_layers == lt.streaming_layers and both.sparse_prefill == cfg
    assert "sparse_prefill" not in lt.to_dict() and both.to_dict()["sparse_prefill"]["method"] == "vslash"


def test_eval_cli_runs_sparse_rows_on_the_same_prompts(tiny_dir_with_tokenizer, text_file, tmp_path, capsys,  # noqa: F811
                                                       report_file, monkeypatch):  # noqa: F811
    """Under the masked backend (the default) the sparse rows still run through the runtime."""
    data = _stub_eval(tiny_dir_with_tokenizer, text_file, tmp_path / "res.json", capsys, report_file, monkeypatch,
                      "--lengths", "96", "--passkey-lengths", "256", "--passkey-depths", "2", "--ratio", "0.5",
                      "--rows", "original,sparse-prefill,lighttransfer,lighttransfer+sparse-prefill",
                      "--sparse-prefill", "antidiag", "--sparse-alpha", "1.0",
                      "--sparse-min-len", "32", "--sparse-blocks", "16,16")
    rows = {r["name"]: r for r in data["rows"]}
    # alpha = 1 keeps every causal block: the sparse rows score exactly like their dense twins
    for dense, sparse in (("original", "sparse-prefill"), ("lighttransfer", "lighttransfer+sparse-prefill")):
        assert rows[sparse]["perplexity"]["96"]["ppl"] == pytest.approx(rows[dense]["perplexity"]["96"]["ppl"],
                                                                        rel=1e-4)
        assert rows[sparse]["passkey"]["outcomes"] == rows[dense]["passkey"]["outcomes"]
        density = rows[sparse]["sparse_prefill_density"]
        assert density["mean"] == 1.0 and density["sparse_forwards"] > 0
    assert set(rows["sparse-prefill"]["sparse_prefill_density"]["by_layer"]) == {"0", "1", "2", "3"}
    assert set(rows["lighttransfer+sparse-prefill"]["sparse_prefill_density"]["by_layer"]) == {"1", "3"}
    assert rows["sparse-prefill"]["sparse_prefill"]["method"] == "antidiag"
