"""The sparse-mass analysis: exact block mass, mass kept vs density per layer, its report and its command."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model, run_cli
from lighttransfer.analysis.sparse_mass import SparseMassReport, exact_block_mass, sparse_mass_tokens
from lighttransfer.errors import LightTransferError


def test_exact_block_mass_is_the_softmax_summed_per_block():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 50, 16, generator=g)
    k = torch.randn(1, 2, 70, 16, generator=g)
    got = exact_block_mass(q, k, block_q=16, block_k=16, scale=0.25)
    s = torch.matmul(q.view(1, 2, 100, 16), k.transpose(-1, -2)).view(1, 4, 50, 70) * 0.25
    causal = torch.arange(70).view(1, -1) <= torch.arange(50).view(-1, 1) + 20
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    p = torch.nn.functional.pad(p, (0, 10)).view(1, 4, 50, 5, 16).sum(-1)
    want = torch.stack([p[:, :, i:i + 16].mean(2) for i in range(0, 50, 16)], dim=2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def report():
    model = make_tiny_model("llama").eval()  # 4 query heads, 2 KV heads
    ids = torch.randint(0, model.config.vocab_size, (2, 200), generator=torch.Generator().manual_seed(1))
    return sparse_mass_tokens(model, ids, method="sample", options={"share": 0.25}, alphas=(0.5, 0.9, 1.0),
                              gqa_lists=("query", "kv-union", "kv-sum"), block_q=16, block_k=16, sink_blocks=1,
                              local_blocks=1)


def test_mass_kept_and_density_per_layer(report):
    layers = {r.layer for r in report.rows}
    assert layers == set(range(4))
    by = {(r.layer, r.alpha, r.gqa_lists): r for r in report.rows}
    for layer in layers:
        dense = by[(layer, 1.0, "query")]
        assert dense.density == pytest.approx(1.0) and dense.kept_mass == pytest.approx(1.0, abs=1e-5)
        lo, hi = by[(layer, 0.5, "query")], by[(layer, 0.9, "query")]
        assert lo.density <= hi.density < 1.0 and lo.kept_mass <= hi.kept_mass
        assert 0 < lo.min_head_kept_mass <= lo.kept_mass
        # the union of a group's selections visits a superset, so it keeps at least the per-head mass
        union = by[(layer, 0.9, "kv-union")]
        assert union.density >= hi.density and union.kept_mass >= hi.kept_mass - 1e-6


def test_measuring_some_layers_stops_the_forward_after_the_last_and_measures_the_same(report):
    model = make_tiny_model("llama").eval()  # the report fixture's model and prompts
    ids = torch.randint(0, model.config.vocab_size, (2, 200), generator=torch.Generator().manual_seed(1))
    ran = []
    for index, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda module, args, index=index: ran.append(index))
    some = sparse_mass_tokens(model, ids, method="sample", options={"share": 0.25}, alphas=(0.5, 0.9, 1.0),
                              gqa_lists=("query", "kv-union", "kv-sum"), block_q=16, block_k=16, sink_blocks=1,
                              local_blocks=1, layers=(2, 0))
    assert some.rows == [r for r in report.rows if r.layer in (0, 2)]
    assert ran == [0, 1, 0, 1]  # both prompts: layer 2's attention inputs end the forward


def test_the_oracle_selects_from_the_exact_mass_and_keeps_at_least_alpha():
    model = make_tiny_model("llama").eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 200), generator=torch.Generator().manual_seed(1))
    report = sparse_mass_tokens(model, ids, method="sample", options={"share": 0.25}, alphas=(0.5, 0.9),
                                gqa_lists=("query",), block_q=16, block_k=16, sink_blocks=1, local_blocks=1,
                                layers=(0, 1), oracle=True)
    by = {(r.layer, r.alpha, r.lists_from): r for r in report.rows}
    assert [r.lists_from for r in report.rows][:2] == ["estimate", "exact"]  # each estimate row before its twin
    assert report.params["oracle"] is True
    for layer in (0, 1):
        for alpha in (0.5, 0.9):
            exact = by[(layer, alpha, "exact")]
            # every (head, query block) keeps at least alpha of its true mass, so the worst head's mean does too
            assert exact.min_head_kept_mass >= alpha - 1e-5 and exact.kept_mass >= alpha - 1e-5
        assert by[(layer, 0.5, "exact")].density < by[(layer, 0.9, "exact")].density < 1.0
    summary = {(s["alpha"], s["lists_from"]) for s in report.summary()}
    assert summary == {(0.5, "estimate"), (0.5, "exact"), (0.9, "estimate"), (0.9, "exact")}


def test_report_round_trips_and_summarizes(report, tmp_path):
    path = tmp_path / "mass.json"
    report.save(path)
    again = SparseMassReport.load(path)
    assert again.rows == report.rows and again.params == report.params
    summary = {(s["alpha"], s["gqa_lists"]): s for s in again.summary()}
    assert summary[(1.0, "query")]["density"] == pytest.approx(1.0)
    assert json.loads(path.read_text())["schema_version"] == 1


def test_bad_options_are_one_line():
    model = make_tiny_model("llama")
    ids = torch.zeros(1, 32, dtype=torch.long)
    with pytest.raises(LightTransferError, match="--alphas"):
        sparse_mass_tokens(model, ids, alphas=(1.5,))
    with pytest.raises(LightTransferError, match="--gqa-lists"):
        sparse_mass_tokens(model, ids, gqa_lists=("heads",))


def test_command_prints_the_table_and_writes_json(tmp_path, capsys):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path / "tiny"
    make_tiny_model("llama").save_pretrained(d)
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                                   merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(d)
    book = tmp_path / "book.txt"
    book.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune.\n" * 30)
    out = tmp_path / "mass.json"
    code, stdout, stderr = run_cli(["sparse-mass", str(d), "--calib", str(book), "--seq-len", "160", "--samples", "1",
                                    "--block-q", "16", "--block-k", "16", "--alphas", "0.8,0.95", "--layers", "1,2",
                                    "--oracle", "--out", str(out), "--device", "cpu"], capsys)
    assert code == 0, stderr
    assert "mass kept" in stdout and "kv-sum" in stdout and "kv-sum, exact" in stdout
    rows = json.loads(out.read_text())["rows"]
    assert {r["layer"] for r in rows} == {1, 2} and {r["alpha"] for r in rows} == {0.8, 0.95}
    code, _, stderr = run_cli(["sparse-mass", str(d), "--alphas", "x", "--device", "cpu"], capsys)
    assert code != 0 and "--alphas 'x'" in stderr and "Traceback" not in stderr
