"""The RULER-style suite on the real SmolLM2-135M: prompts fitted to its tokenizer, generation and scoring."""

from __future__ import annotations

import contextlib

import pytest

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


def test_the_real_model_finds_single_needles_and_the_scores_say_so(real_model, long_text):
    from lighttransfer.evaluation.ruler import build_samples, run_samples

    samples = build_samples(real_model.tokenizer, lengths=[512], samples_per_task=2, tasks=["niah_single_1"],
                            essay_text=long_text[:100_000], seed=0)
    assert all(480 <= len(s.input_ids) <= 512 for s in samples)
    dense = run_samples(lambda: contextlib.nullcontext((real_model.model, None)), samples,
                        tokenizer=real_model.tokenizer)
    # SmolLM2-135M retrieves a 7-digit number from 512 tokens of filler (measured: 3 of 3 at 512 and 1024)
    assert dense["by_task"]["niah_single_1"] == 100.0
    assert all(s["answers"][0] in s["prediction"] for s in dense["samples"])
