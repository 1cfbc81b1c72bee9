"""Gated attention (DuoAttention Eq. 1) and the gate optimization, on tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_tiny_model
from lighttransfer.analysis.head_gates import (
    HeadGateResult,
    PasskeyRows,
    distill_loss,
    full_kv_heads,
    lr_factor,
    optimize_head_gates,
)
from lighttransfer.analysis.head_gates_attention import ATTENTION_NAME, gated_attention
from lighttransfer.errors import LightTransferError
from lighttransfer.kernels import streaming_attention_reference

SINK, WINDOW, SEQ = 3, 16, 90
REFERENCE_NAME = "lighttransfer_test_head_reference"


def _shape(model) -> tuple[int, int]:
    return model.config.num_hidden_layers, model.config.num_key_value_heads


def _hidden(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model.model(input_ids=ids, use_cache=False).last_hidden_state


def _reference_hidden(model, ids, streams: torch.Tensor) -> torch.Tensor:
    """Final hidden states with the fp32 dense-mask reference of the kernels: KV head ``streams[l, j]`` streams."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    def reference(module, query, key, value, attention_mask, scaling=None, **kwargs):
        group = query.shape[1] // key.shape[1]
        per_q_head = streams[module.layer_idx].repeat_interleave(group)
        out = streaming_attention_reference(query, key, value, sink=SINK, window=WINDOW, scale=scaling,
                                            stream_heads=per_q_head)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(REFERENCE_NAME, reference)
    AttentionMaskInterface.register(REFERENCE_NAME, AttentionMaskInterface._global_mapping["sdpa"])
    previous = model.config._attn_implementation
    model.config._attn_implementation = REFERENCE_NAME
    try:
        return _hidden(model, ids)
    finally:
        model.config._attn_implementation = previous


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # both sides are fp32 of the same math; the floor covers summation order
    err = (actual - expected).abs().max().item()
    assert err <= 1e-5 * max(1.0, expected.abs().max().item()), err


@pytest.fixture
def ids():
    return torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(1))


def test_all_gates_open_reproduce_the_full_model_exactly(tiny_model, ids):
    expected = _hidden(tiny_model, ids)
    with gated_attention(tiny_model.model, torch.ones(_shape(tiny_model)), sink=SINK, window=WINDOW):
        actual = _hidden(tiny_model, ids)
    assert torch.equal(actual, expected)
    assert tiny_model.config._attn_implementation == "sdpa"  # restored


def test_all_gates_closed_match_the_streaming_reference(tiny_model, ids):
    shape = _shape(tiny_model)
    expected = _reference_hidden(tiny_model, ids, torch.ones(shape, dtype=torch.bool))
    with gated_attention(tiny_model.model, torch.zeros(shape), sink=SINK, window=WINDOW):
        actual = _hidden(tiny_model, ids)
    _close(actual, expected)
    assert not torch.allclose(actual, _hidden(tiny_model, ids), atol=1e-3)  # the window really cut keys


def test_binary_gates_match_the_per_head_reference(ids):
    model = make_tiny_model("llama")
    streams = torch.tensor([[True, False], [False, True], [True, True], [False, False]])
    expected = _reference_hidden(model, ids, streams)
    with gated_attention(model.model, (~streams).float(), sink=SINK, window=WINDOW):
        actual = _hidden(model, ids)
    _close(actual, expected)


def test_only_the_gates_receive_gradients(tiny_model, ids):
    tiny_model.requires_grad_(False)
    gates = torch.nn.Parameter(torch.full(_shape(tiny_model), 0.5))
    with gated_attention(tiny_model.model, gates, sink=SINK, window=WINDOW):
        tiny_model.model(input_ids=ids).last_hidden_state.square().mean().backward()
    assert gates.grad is not None and gates.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_model.parameters())


def test_gated_attention_restores_on_error_and_checks_shape(ids):
    model = make_tiny_model("llama")
    with pytest.raises(LightTransferError, match="gates have shape"):
        with gated_attention(model.model, torch.ones(3, 2), sink=SINK, window=WINDOW):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with gated_attention(model.model, torch.ones(_shape(model)), sink=SINK, window=WINDOW):
            assert model.config._attn_implementation == ATTENTION_NAME
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def _rows(samples: int = 3, seq: int = 128) -> PasskeyRows:
    ids = torch.randint(0, 256, (samples, seq), generator=torch.Generator().manual_seed(7))
    return PasskeyRows(input_ids=ids, supervised=[6] * samples, depths=[0.1] * samples)


def _run(model, **kw) -> HeadGateResult:
    args = dict(sink=2, window=16, steps=16, lr=0.1, l1=0.05, seed=0, rows=_rows())
    return optimize_head_gates(model, None, **(args | kw))


@pytest.fixture(scope="module")
def trained():
    model = make_tiny_model("llama")
    return model, _run(model)


def test_optimization_lowers_the_loss_and_the_gates(trained):
    model, result = trained
    assert len(result.loss_history) == 16 and result.distill_history[0] == 0.0  # starts at the full model
    assert result.loss_history[-1] < result.loss_history[0]
    assert result.gate_mean_history[-1] < 0.9
    assert all(0.0 <= g <= 1.0 for row in result.gates for g in row)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_learned_gates_beat_uniform_gates_of_the_same_budget(trained):
    # the optimizer spends its gate budget where streaming hurts most: better than spreading it evenly
    model, result = trained
    rows = _rows()
    learned = torch.tensor(result.gates)
    uniform = torch.full_like(learned, float(learned.mean()))

    def error(gates):
        total = 0.0
        for i in range(rows.input_ids.shape[0]):
            target = _hidden(model, rows.input_ids[i : i + 1])[0, -6:]
            with gated_attention(model.model, gates, sink=2, window=16):
                total += float(distill_loss(_hidden(model, rows.input_ids[i : i + 1])[0, -6:], target))
        return total

    assert error(learned) < error(uniform)


def test_same_seed_same_gates(trained):
    model, result = trained
    again = _run(model)
    assert again.gates == result.gates and again.loss_history == result.loss_history


def test_result_round_trip(trained):
    _, result = trained
    data = json.loads(json.dumps(result.to_dict(), sort_keys=True))
    back = HeadGateResult.from_dict(data)
    assert back == result
    with pytest.raises(LightTransferError, match="schema_version"):
        HeadGateResult.from_dict(data | {"schema_version": 99})
    with pytest.raises(LightTransferError, match=r"\[0, 1\]"):
        HeadGateResult.from_dict(data | {"gates": [[1.5] * result.num_kv_heads] * result.num_layers})


@pytest.mark.parametrize(("kw", "expected"), [
    (dict(threshold=0.5), [[True, False, False], [False, True, True]]),
    (dict(share=0.5), [[True, False, False], [False, True, True]]),
    (dict(share=1 / 3), [[True, False, False], [False, True, False]]),
], ids=["threshold", "half", "third"])
def test_full_kv_heads(kw, expected):
    assert full_kv_heads([[0.9, 0.1, 0.2], [0.0, 0.8, 0.6]], **kw) == expected


def test_schedule_warms_up_and_decays():
    factors = [lr_factor(s, 100) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[50] == 1.0 and factors[-1] == pytest.approx(0.1)
    assert max(factors) == 1.0 and all(math.isfinite(f) and f > 0 for f in factors)


def test_bad_arguments_are_one_line_errors():
    model = make_tiny_model("llama")
    with pytest.raises(LightTransferError, match="seq-len"):
        optimize_head_gates(model, None, sink=4, window=256, steps=2, rows=_rows(seq=128))
    with pytest.raises(LightTransferError, match="gate-l1"):
        optimize_head_gates(model, None, sink=2, window=16, steps=2, l1=-1.0, rows=_rows())


# ---- the analysis report and the analyze command ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama (vocab 256) with a byte-level tokenizer, so the passkey prompts can be built."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny-llama-gates")
    make_tiny_model("llama").save_pretrained(d)
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(d)
    return d


def test_analyze_method_optimize_stores_gates_that_convert_ranks(tiny_dir, tmp_path, capsys):
    from lighttransfer import cli
    from lighttransfer.analysis.report import AnalysisReport
    from lighttransfer.convert.selection import select_kv_heads

    out = tmp_path / "report.json"
    argv = ["analyze", str(tiny_dir), "--calib", "synthetic:passkey", "--seq-len", "400", "--samples", "2",
            "--sink", "2", "--recent", "16", "--last", "8", "--method", "optimize", "--gate-steps", "3",
            "--gate-l1", "0.05", "--gate-formats", "ticket,vault", "--gate-samples", "3", "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0, capsys.readouterr().err
    report = AnalysisReport.load(out)
    gates = report.kv_head_gates
    assert report.head_score_method == "optimize" and len(gates) == 4 and all(len(r) == 2 for r in gates)
    assert report.params["gates"]["steps"] == 3 and report.params["gates"]["window"] == 16
    assert report.params["gates"]["templates"] == ["ticket", "vault"]
    assert report.params["gates"]["samples"] == 3 and report.calibration["samples"] == 2
    assert report.kv_head_long_context_scores() == gates
    assert report.kv_head_long_context_scores("attention") == report.kv_heads.long_context_mass
    layer_scores = report.layer_streaming_scores()
    assert layer_scores == [1.0 - max(row) for row in gates]
    assert report.layer_streaming_scores("attention") == report.layer_lazy_ratios()
    hybrid = tmp_path / "hybrid"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", str(tiny_dir), "--report", str(out), "--ratio", "0.5", "--sink", "2", "--window", "16",
                  "--out", str(hybrid)])
    assert exit_info.value.code == 0, capsys.readouterr().err
    block = json.loads((hybrid / "config.json").read_text())["lighttransfer"]
    by_gate = sorted(range(4), key=lambda i: (-layer_scores[i], i))[:2]  # the two layers whose gates are lowest
    assert block["streaming_layers"] == sorted(by_gate)
    assert block["report_summary"]["selection"]["score"] == "optimize"
    card = (hybrid / "README.md").read_text()
    assert "| 1 - max gate |" in card and "lowest gates" in card  # the table explains the ranking it used
    streamed = select_kv_heads(report.kv_head_long_context_scores(), ratio=0.5)
    lowest = sorted(((g, layer, head) for layer, row in enumerate(gates) for head, g in enumerate(row)))[:4]
    assert {(layer, head) for _, layer, head in lowest} == {(layer, head) for layer, mask in streamed.items()
                                                            for head, s in enumerate(mask) if s}


def test_training_rows_take_the_wordings_in_turn_and_keep_the_key_out_of_the_window(tiny_dir):
    from lighttransfer.analysis.head_gates import passkey_rows
    from lighttransfer.calibration.passkey import TEMPLATES
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    rows = passkey_rows(tokenizer, samples=4, seq_len=500, window=64, seed=1, templates=("vault", "ticket"))
    assert rows.input_ids.shape == (4, 500) and rows.templates == ["vault", "ticket", "vault", "ticket"]
    for i, template in enumerate(rows.templates):
        text = tokenizer.decode(rows.input_ids[i])
        answer = tokenizer.decode(rows.input_ids[i, -(rows.supervised[i] - 1):])
        prompt = text[: len(text) - len(answer)]
        assert prompt.endswith(TEMPLATES[template].question) and answer.strip() in prompt
        # the key sits farther back than the window: only full attention can retrieve it
        key_at = len(tokenizer(prompt[: prompt.index(answer.strip())])["input_ids"])
        assert 500 - key_at > 64
    with pytest.raises(LightTransferError, match="--gate-formats 'riddle'"):
        passkey_rows(tokenizer, samples=2, seq_len=500, window=64, seed=1, templates=("riddle",))


def test_analyze_rejects_an_unknown_gate_format_in_one_line(tiny_dir, tmp_path, capsys):
    from conftest import run_cli

    out = tmp_path / "report.json"
    code, _, err = run_cli(["analyze", str(tiny_dir), "--method", "optimize", "--gate-formats", "passkey,riddle",
                            "--out", str(out)], capsys)
    assert code != 0 and "Traceback" not in err and "--gate-formats 'riddle'" in err and not out.exists()


def test_report_without_gates_refuses_the_optimize_scores(tiny_dir, tmp_path):
    from lighttransfer.analysis.pipeline import analyze
    from lighttransfer.analysis.report import AnalysisReport

    report = analyze(str(tiny_dir), calib="synthetic:passkey", seq_len=400, samples=1, sink=2, window=16, last=8,
                     device="cpu")
    assert report.kv_head_gates is None and report.head_score_method == "attention"
    with pytest.raises(LightTransferError, match="--method optimize"):
        report.kv_head_long_context_scores("optimize")
    data = report.to_dict() | {"head_score_method": "optimize"}
    with pytest.raises(LightTransferError, match="head_score_method"):
        AnalysisReport.from_dict(data)
    data = report.to_dict() | {"kv_head_gates": [[0.5, 0.5]] * 3}
    with pytest.raises(LightTransferError, match="kv_head_gates"):
        AnalysisReport.from_dict(data)
