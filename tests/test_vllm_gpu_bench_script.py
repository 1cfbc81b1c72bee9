"""The vLLM benchmark script's decode-phase split and token counting (pure parts; no vLLM needed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "scripts" / "vllm_gpu_bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("vllm_gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _out(request_id, tokens):
    return SimpleNamespace(request_id=request_id, outputs=[SimpleNamespace(token_ids=list(tokens))])


def test_the_split_is_after_the_step_that_gives_the_last_request_its_first_token(bench):
    Step = bench.Step
    steps = [Step(0.5, 0.5, 0, 0),  # a prefill chunk, no token yet
             Step(1.0, 0.4, 1, 1),  # request 0's first token
             Step(2.0, 0.9, 2, 2),  # request 0 decodes, request 1's first token: the split
             Step(2.1, 0.08, 2, 2), Step(2.3, 0.1, 2, 2), Step(2.6, 0.12, 1, 2), Step(2.7, 0.05, 0, 2)]
    got = bench.decode_phase(steps, batch=2)
    assert got["prefill_s"] == pytest.approx(2.0) and got["prefill_steps"] == 3
    assert got["decode_s"] == pytest.approx(0.7) and got["decode_steps"] == 4 and got["decode_tokens"] == 5
    assert got["decode_tokens_per_s"] == pytest.approx(5 / 0.7, abs=0.05)
    assert got["decode_step_median_ms"] == pytest.approx(90.0)  # of 80, 100, 120, 50 ms
    assert got["decode_idle_steps"] == 1


def test_no_decode_rate_when_a_request_never_starts_or_nothing_follows_the_split(bench):
    Step = bench.Step
    never = bench.decode_phase([Step(1.0, 1.0, 1, 1), Step(2.0, 1.0, 1, 1)], batch=2)
    assert never["prefill_s"] is None and never["decode_tokens_per_s"] is None and never["prefill_steps"] == 2
    last = bench.decode_phase([Step(1.0, 1.0, 2, 2)], batch=2)  # one new token each: all of it is prefill
    assert last["prefill_s"] == pytest.approx(1.0) and last["decode_steps"] == 0
    assert last["decode_tokens_per_s"] is None and last["decode_step_median_ms"] is None


@pytest.mark.parametrize("cumulative", [True, False])
def test_token_counts_are_the_same_from_cumulative_and_delta_outputs(bench, cumulative):
    made = {"a": [5, 6, 7], "b": [9, 8]}  # a: one token a step for 3 steps; b: starts a step later
    counts, per_step = {}, []
    for step in range(3):
        outs = []
        for rid, tokens in made.items():
            first = step - (rid == "b")
            if 0 <= first < len(tokens):
                outs.append(_out(rid, tokens[:first + 1] if cumulative else tokens[first:first + 1]))
        per_step.append(bench.count_new_tokens(outs, counts, cumulative=cumulative))
    assert per_step == [1, 2, 2] and counts == {"a": 3, "b": 2}


def test_the_full_batch_phase_takes_only_steps_where_every_request_decodes(bench):
    Step = bench.Step
    steps = [Step(1.0, 1.0, 1, 1),  # request 0's first token
             Step(2.0, 1.0, 2, 2),  # request 0 decodes beside request 1's prefill: the split
             Step(2.02, 0.02, 2, 2), Step(2.05, 0.03, 2, 2), Step(2.09, 0.04, 2, 2),
             Step(2.1, 0.01, 1, 2)]  # request 0 finished: not full
    got = bench.full_batch_phase(steps, batch=2)
    assert got["full_batch_steps"] == 3 and got["full_batch_step_median_ms"] == pytest.approx(30.0)
    assert got["full_batch_tokens_per_s"] == pytest.approx(2 / 0.03, abs=0.1)
    assert bench.full_batch_phase(steps[:2], batch=2)["full_batch_tokens_per_s"] is None


@pytest.mark.parametrize(("context", "batch", "step_tokens"), [(32768, 47, 2048), (16384, 83, 2048), (4096, 4, 512)])
def test_planned_new_tokens_outlast_the_prefill_of_every_prompt(bench, context, batch, step_tokens):
    measure = 128
    new = bench.plan_new_tokens(context, batch, step_tokens, measure)
    prefill_steps = batch * (context - new) / (step_tokens - batch)  # steps until the last prompt is in
    assert new >= prefill_steps + measure and new <= context // 2


def test_a_step_budget_below_the_batch_is_refused(bench):
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        bench.plan_new_tokens(4096, 64, 64, 16)


def test_the_block_batch_charges_the_chunk_reserve_to_the_prefilling_requests_only(bench):
    Group = bench.Group
    full, streaming = Group(16), Group(16, window=1020, sink=4)
    # the 8B shape at 32k on the H200: 112,243 blocks for two groups of 16 layers, 2048-token steps
    hybrid = bench.blocks_batch(112243, [full, streaming], 32768, 2048)
    per_request = 2048 + (1 + 64 + 1)  # full group + sink block, the window and two decode tokens, slack
    assert hybrid == (112243 - 1 - 2 * (1 + 320 + 1 - 66)) // per_request == 52
    assert bench.blocks_batch(56121, [full], 32768, 2048) == 27  # dense: vLLM's own 27.4
    reported = 112243 / (2048 + 1 + 320 + 1)  # vLLM's charge: the window plus two whole steps, every request
    assert hybrid > reported > 47


def test_the_stepwise_run_stops_after_the_full_batch_steps_full_batch_phase_counts(bench, monkeypatch):
    """run_stepwise's running count of full-batch steps is full_batch_phase's: it stops on the N-th one."""
    made = [[1, 0], [1, 1], [2, 1], [2, 2], [3, 3], [4, 4], [5, 5], [6, 6]]  # tokens per request after each step

    class Engine:
        def __init__(self):
            self.at, self.aborted = -1, None

        def add_request(self, *args):
            pass

        def has_unfinished_requests(self):
            return self.aborted is None and self.at + 1 < len(made)

        def step(self):
            self.at += 1
            return [_out(f"bench-{i}", [0] * n) for i, n in enumerate(made[self.at])]

        def abort_request(self, ids):
            self.aborted = list(ids)

    monkeypatch.setattr(bench, "_stepwise_params", lambda new_tokens: (None, True))
    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace())
    monkeypatch.setitem(sys.modules, "vllm.inputs", SimpleNamespace(TokensPrompt=lambda **kw: kw))
    llm = SimpleNamespace(llm_engine=Engine())
    _, steps, _ = bench.run_stepwise(llm, [[1], [2]], 8, measure_steps=2)
    assert bench.full_batch_phase(steps, 2)["full_batch_steps"] == 2 and len(steps) == 6
    assert llm.llm_engine.aborted == ["bench-0", "bench-1"]


def test_teacher_forced_gaps_are_zero_where_the_tokens_are_our_argmax_and_measured_where_not(bench):
    import torch

    prompt, tokens = [5, 6, 7], [1, 2, 0]
    # logits at positions 2, 3, 4 (those that predict the three tokens) and one before, one after
    logits = torch.zeros(1, 6, 4)
    logits[0, 2] = torch.tensor([0.0, 3.0, 1.0, 0.0])   # predicts 1: our argmax
    logits[0, 3] = torch.tensor([0.0, 0.0, 2.0, 1.5])   # predicts 2: our argmax, own top-2 gap 0.5
    logits[0, 4] = torch.tensor([1.0, 1.25, 0.0, 0.0])  # vLLM took 0, ours is 1: gap 0.25

    def runtime(ids, attention_mask):
        assert ids.tolist() == [prompt + tokens]
        return SimpleNamespace(logits=logits)

    got = bench._teacher_forced(runtime, prompt, tokens, "cpu")
    assert got["argmax_equal"] == 2 and got["positions"] == 3
    assert got["max_gap"] == pytest.approx(0.25) and got["gaps_where_differ"] == [0.25]
    assert got["own_top2_gap_median"] == pytest.approx(0.5)  # of 2.0, 0.5 and 0.25
