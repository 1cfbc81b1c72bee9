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
    args = dict(sink=2, window=16, steps=24, lr=0.08, l1=0.05, seed=0, rows=_rows())
    return optimize_head_gates(model, None, **(args | kw))


@pytest.fixture(scope="module")
def trained():
    model = make_tiny_model("llama")
    return model, _run(model)


def test_optimization_lowers_the_loss_and_the_gates(trained):
    model, result = trained
    assert len(result.loss_history) == 24 and result.distill_history[0] == 0.0  # starts at the full model
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
