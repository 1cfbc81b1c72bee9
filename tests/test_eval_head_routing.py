"""Evaluation rows with head routing: built by name at one share, run by the runtime under either backend, their
thresholds calibrated for the share, the realised share in the result; ``eval --rows ...,qada,...`` runs."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import run_cli
from lighttransfer.errors import LightTransferError
from lighttransfer.evaluation.rows import DEFAULT_ROWS, ROUTING_ROWS, standard_rows
from lighttransfer.hybrid_format import HeadRoutingConfig

GATES = [[0.9, 0.1], [0.2, 0.8], [0.05, 0.95], [0.7, 0.6]]


def test_rows_are_built_by_name_at_one_share():
    rows = {r.name: r for r in standard_rows(lazy_ratios=[0.9, 0.2, 0.8, 0.1], ratio=0.5, num_kv_heads=2, sink=2,
                                             window=16, names=list(ROUTING_ROWS), kv_head_gates=GATES,
                                             routing_share=0.25)}
    assert not set(ROUTING_ROWS) & set(DEFAULT_ROWS)
    for row in rows.values():
        assert row.streaming_layers == [] and not row.is_dense and row.needs_runtime
        assert row.kv_fraction(1000) == 1.0  # routing reads less, it keeps everything
    assert rows["qada"].routing_target == rows["qada-oracle"].routing_target == 0.25
    assert rows["qada-oracle"].head_routing.mode == "oracle"
    # one field apart from qada each, calibrated for the same share
    base = rows["qada"].head_routing
    assert (base.stats, base.cov, base.guard) == ("bulk", "full", "none")
    assert rows["qada-local"].head_routing == dataclasses.replace(base, stats="local")
    assert rows["qada-diag"].head_routing == dataclasses.replace(base, cov="diag")
    assert rows["qada-pages"].head_routing == dataclasses.replace(base, guard="pages")
    assert {rows[n].routing_target for n in ("qada-local", "qada-diag", "qada-pages")} == {0.25}
    paged = standard_rows(lazy_ratios=[0.5] * 4, ratio=0.5, num_kv_heads=2, sink=2, window=16,
                          names=["qada", "qada-pages", "qada-oracle"], routing_page=16,
                          head_routing=HeadRoutingConfig(mode="qada", tau=0.0, guard="pages"))
    assert paged[0].head_routing.page_size == 64 and paged[1].head_routing.page == 16
    assert paged[2].head_routing.guard == "none"  # the oracle is exact: nothing to guard
    assert rows["qada-random"].head_routing.share == 0.25 and rows["qada-random"].routing_target is None
    # 2 of 8 KV heads, the lowest gates: (2, 0) and (0, 1)
    assert rows["qada-gates"].head_routing.local_masks == {0: [False, True], 2: [True, False]}
    # the heads guard: a quarter of the KV heads, the highest gates, (2, 1) and (0, 0), always full; QAdA on the
    # rest, calibrated for the same share over all decisions
    heads = rows["qada-heads"].head_routing
    assert heads == dataclasses.replace(base, guard="heads", full_masks={0: [True, False], 2: [False, True]})
    assert rows["qada-heads"].routing_target == 0.25
    fixed = standard_rows(lazy_ratios=[0.5] * 4, ratio=0.5, num_kv_heads=2, sink=2, window=16, names=["qada"],
                          routing_tau=0.1)[0]
    assert fixed.routing_target is None and fixed.head_routing.tau == 0.1
    with pytest.raises(LightTransferError, match="gates"):
        standard_rows(lazy_ratios=[0.5] * 4, ratio=0.5, num_kv_heads=2, sink=2, window=16, names=["qada-gates"])
    with pytest.raises(LightTransferError, match="qada-heads row needs KV-head gates"):
        standard_rows(lazy_ratios=[0.5] * 4, ratio=0.5, num_kv_heads=2, sink=2, window=16, names=["qada-heads"])


def test_eval_cli_runs_the_routing_rows(tmp_path, capsys, long_text, monkeypatch):
    from test_eval import eval_inputs

    model_dir, text = eval_inputs(tmp_path, long_text, monkeypatch, kv_head_gates=GATES,
                                  kv_head_long_context_scores=staticmethod(lambda method=None: GATES))
    out = tmp_path / "res.json"
    code, _, err = run_cli([
        "eval", "--baseline", str(model_dir), "--text", str(text), "--report", "r.json", "--lengths", "96",
        "--windows", "1", "--passkey-lengths", "256", "--passkey-depths", "2", "--passkey-trials", "1",
        "--sink", "2", "--window", "16", "--rows", "original," + ",".join(ROUTING_ROWS),
        "--routing-share", "0.5", "--routing-cov", "diag", "--routing-page", "8", "--device", "cpu", "--out", str(out), "-q"], capsys)
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    for name in ("qada", "qada-oracle"):
        assert rows[name]["routing_calibration"]["share"] == 0.5 and rows[name]["routing_calibration"]["layer_tau"]
        # held-out samples of both evaluated kinds, two each (the default)
        assert rows[name]["routing_calibration"]["on"] == "prompts"
        assert rows[name]["routing_calibration"]["kinds"] == {"text": 12, "passkey": 12}
        by_part = rows[name]["head_routing_realised_by_part"]
        assert set(by_part) == {"perplexity", "passkey"}
        assert sum(p["decisions"] for p in by_part.values()) == rows[name]["head_routing_realised"]["decisions"]
        assert rows[name]["head_routing"]["cov"] == "diag"
    assert rows["qada-pages"]["head_routing"]["guard"] == "pages" and rows["qada-pages"]["head_routing"]["page"] == 8
    assert rows["qada-pages"]["routing_calibration"]["layer_tau"]
    for name in ROUTING_ROWS:
        realised = rows[name]["head_routing_realised"]
        assert realised["decisions"] > 0 and 0.0 <= realised["local_share"] <= 1.0
    assert rows["qada-gates"]["head_routing_realised"]["local_share"] == pytest.approx(0.5)  # 4 of 8 heads
    assert "head_routing_realised" not in rows["original"]
    assert "Head routing: 50.0% of" in (tmp_path / "res.md").read_text()
    assert "on held-out samples (12 text, 12 passkey)" in (tmp_path / "res.md").read_text()
    assert "  - by part: perplexity " in (tmp_path / "res.md").read_text()


class _CallableWords:
    """The RULER tests' word tokenizer, also callable as a Hugging Face tokenizer (``tok(text)["input_ids"]``)."""

    def __init__(self):
        from test_ruler import WordTokenizer

        self.words = WordTokenizer(vocab_size=512)
        self.eos_token_id = 0

    def encode(self, text):
        return self.words.encode(text)

    def decode(self, ids, skip_special_tokens=True):
        return self.words.decode(ids, skip_special_tokens)

    def __call__(self, text, add_special_tokens=False, **_):
        return {"input_ids": self.words.encode(text)}


def test_routing_calibration_draws_held_out_samples_of_every_evaluated_kind(long_text):
    import torch
    from lighttransfer.errors import LightTransferError
    from lighttransfer.evaluation.eval_suite import routing_calibration_samples
    from lighttransfer.evaluation.passkey import passkey_samples

    tok = _CallableWords()
    ids = torch.tensor(tok.encode(long_text))
    common = dict(lengths=[200], passkey_lengths=[300], depths=[0.0, 0.5, 1.0], formats=["passkey"],
                  ruler_lengths=[300], ruler_tasks=["niah_single_1", "vt"], seed=0)
    picked, lasts, drawn = routing_calibration_samples(ids, tok, long_text, on="prompts", count=2, **common)
    assert drawn["on"] == "prompts" and drawn["kinds"] == {"text": 2, "passkey": 2, "niah_single_1": 2, "vt": 2}
    assert len(picked) == 8 and drawn["samples"] == 8 and len(lasts) == 8
    # text stretches from the end of the text, of the perplexity length
    assert torch.equal(picked[0], ids[-200:]) and torch.equal(picked[1], ids[-400:-200])
    # passkey prompts end with their answer, and their keys are not the evaluated ones (same seed, other draws)
    evaluated = passkey_samples(tok, long_text, lengths=[300], depths=[0.0, 0.5, 1.0], trials=2, seed=0)
    assert lasts[:2] == [32, 32]  # the text's last 32 tokens, the answers' tokens below
    for sample, last in zip(picked[2:4], lasts[2:4], strict=True):
        assert 300 < sample.numel() <= 320 and sample.numel() - last == 300
        assert not any(torch.equal(sample[:300], e.prompt_ids.view(-1)) for e in evaluated)
    assert all(n >= 1 for n in lasts[4:])  # RULER prompts plus their answers, the answer tokens decided
    assert all(s.numel() - n <= 300 for s, n in zip(picked[4:], lasts[4:], strict=True))  # prompts fitted to 300
    text_only, lasts, drawn = routing_calibration_samples(ids, tok, long_text, on="text", count=3, **common)
    assert drawn == {"on": "text", "samples": 3, "tokens": 300} and all(s.numel() == 300 for s in text_only)
    assert lasts == [32, 32, 32]
    with pytest.raises(LightTransferError, match="--routing-calibrate-on"):
        routing_calibration_samples(ids, tok, long_text, on="tasks", count=2, **common)
    with pytest.raises(LightTransferError, match="tokens of text"):
        routing_calibration_samples(ids[:250], tok, long_text, on="prompts", count=2, **common)


def test_the_share_by_part_skips_parts_without_decisions():
    from types import SimpleNamespace

    from lighttransfer.evaluation.eval_suite import _RoutedByPart

    stats = [{}, {"local_share": None, "decisions": 0}, {"local_share": 0.5, "decisions": 40},
             {"local_share": 0.25, "decisions": 80}]
    by_part = _RoutedByPart(SimpleNamespace(routing_stats=lambda: stats.pop(0)))
    for part in ("before", "perplexity", "passkey", "ruler"):  # nothing yet, then no decision, then 40, then 40
        by_part.close(part)
    assert by_part.shares == {"passkey": {"local_share": 0.5, "decisions": 40},
                              "ruler": {"local_share": 0.0, "decisions": 40}}
