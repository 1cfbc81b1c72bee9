"""Confidence intervals of retrieval accuracy (pure functions)."""

from __future__ import annotations

import pytest
from lighttransfer.evaluation.stats import paired_difference, wilson_interval


@pytest.mark.parametrize("hits, n, expected", [
    (0, 10, (0.0, 0.2775)),
    (10, 10, (0.7225, 1.0)),
    (5, 10, (0.2366, 0.7634)),
    (86, 100, (0.7780, 0.9144)),
], ids=["none", "all", "half", "86-of-100"])
def test_wilson_interval_matches_the_closed_form(hits, n, expected):
    low, high = wilson_interval(hits, n)
    assert low == pytest.approx(expected[0], abs=1e-3) and high == pytest.approx(expected[1], abs=1e-3)
    assert 0.0 <= low <= hits / n <= high <= 1.0


def test_wilson_interval_narrows_with_more_prompts_and_rejects_nonsense():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    wide, narrow = wilson_interval(8, 10), wilson_interval(80, 100)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_paired_difference_uses_the_per_prompt_pairs():
    same = [True, False, True, True] * 25
    assert paired_difference(same, same) == (0.0, 0.0, 0.0)  # identical answers: no doubt at all
    better = [True] * 100
    diff, low, high = paired_difference(better, same)
    assert diff == pytest.approx(0.25) and 0.0 < low < diff < high <= 1.0
    # the same two accuracies with unrelated prompts would give a much wider interval than this paired one
    assert high - low < 0.2
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference([True], [True, False])
