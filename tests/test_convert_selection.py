"""Selection rules: which layers / KV heads stream, pure functions only."""

from __future__ import annotations

import pytest
from lighttransfer.convert.selection import (
    explain_selection,
    select_kv_heads,
    select_layers,
    split_head_masks,
    streaming_count,
)
from lighttransfer.errors import LightTransferError

LAZY = [0.10, 0.90, 0.50, 0.90, 0.20, 0.70]  # layers 1 and 3 tie for laziest


@pytest.mark.parametrize(("ratio", "total", "expected"), [(0.5, 6, 3), (0.5, 5, 3), (0.25, 6, 2), (1.0, 7, 7),
                                                          (0.1, 4, 0), (0.125, 4, 1)],
                         ids=lambda v: str(v))
def test_streaming_count_rounds_half_up(ratio, total, expected):
    assert streaming_count(ratio, total) == expected


def test_lazy_picks_highest_ratios_with_lower_index_tie_break():
    assert select_layers(LAZY, ratio=0.5) == [1, 3, 5]
    # one slot left for the tie between 1 and 3: the lower index wins
    assert select_layers(LAZY, ratio=1 / 6) == [1]


def test_keep_protects_layers_and_next_laziest_moves_up():
    assert select_layers(LAZY, ratio=0.5, keep=[3]) == [1, 2, 5]


def test_ratio_one_with_keep_streams_every_other_layer():
    assert select_layers(LAZY, ratio=1.0, keep=[0]) == [1, 2, 3, 4, 5]


def test_least_lazy_is_the_opposite_ranking():
    assert select_layers(LAZY, ratio=0.5, strategy="least_lazy") == [0, 2, 4]


def test_random_is_seeded_and_respects_keep():
    a = select_layers(LAZY, ratio=0.5, strategy="random", seed=3, keep=[1])
    assert a == select_layers(LAZY, ratio=0.5, strategy="random", seed=3, keep=[1])
    assert len(a) == 3 and 1 not in a
    draws = {tuple(select_layers(LAZY, ratio=0.5, strategy="random", seed=s)) for s in range(20)}
    assert len(draws) > 1


def test_manual_layers_override_the_ranking():
    assert select_layers(LAZY, ratio=0.5, layers=[4, 0]) == [0, 4]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(ratio=0.0), "out of range"),
        (dict(ratio=1.5), "out of range"),
        (dict(ratio=float("nan")), "out of range"),
        (dict(ratio=0.5, layers=[6]), "no such layer"),
        (dict(ratio=0.5, layers=[-1]), "no such layer"),
        (dict(ratio=0.5, keep=[9]), "no such layer"),
        (dict(ratio=0.5, layers=[2, 2]), "more than once"),
        (dict(ratio=0.5, layers=[2], keep=[2]), "both in --layers and --keep"),
        (dict(ratio=0.5, strategy="best"), "not known"),
    ],
    ids=["ratio=0", "ratio=1.5", "ratio=nan", "layer-too-high", "layer-negative", "keep-too-high", "duplicate",
         "layers-and-keep", "strategy"],
)
def test_bad_selection_inputs_are_one_line_errors(kwargs, match):
    with pytest.raises(LightTransferError, match=match) as info:
        select_layers(LAZY, **kwargs)
    assert "\n" not in str(info.value)


SCORES = [  # [layers=3][kv_heads=2], higher = needs long context
    [0.1, 0.2],
    [0.9, 0.05],
    [0.3, 0.4],
]


def test_kv_heads_stream_lowest_scores_model_wide():
    masks = select_kv_heads(SCORES, ratio=0.5)  # 3 of 6 heads: 0.05, 0.1, 0.2
    assert masks == {0: [True, True], 1: [False, True]}
    assert split_head_masks(masks) == ([0], {1: [False, True]})


def test_kv_heads_keep_layers_and_ratio_one():
    masks = select_kv_heads(SCORES, ratio=1.0, keep_layers=[1])
    assert split_head_masks(masks) == ([0, 2], {})


def test_kv_heads_least_lazy_streams_highest_scores():
    assert select_kv_heads(SCORES, ratio=1 / 6, strategy="least_lazy") == {1: [True, False]}


def test_explain_selection_says_why():
    rows = explain_selection(num_layers=6, num_kv_heads=2, streaming_layers=[1, 5], head_masks={2: [True, False]},
                             lazy_ratios=LAZY, keep=[3])
    kinds = [r.kind for r in rows]
    assert kinds == ["full", "streaming", "mixed", "full", "full", "streaming"]
    assert rows[3].reason == "kept full (--keep)"
    assert [r.rank for r in rows] == [6, 1, 4, 2, 5, 3]
    assert rows[2].streaming_heads == 1


@pytest.mark.parametrize("strategy", ["lazy", "least_lazy"])
def test_layers_without_a_score_are_picked_last(strategy):
    ratios = [0.5, float("nan"), 0.9, 0.1]
    picked = select_layers(ratios, ratio=0.75, strategy=strategy)
    assert 1 not in picked and len(picked) == 3


def test_layer_scores_from_gates_rank_a_layer_by_its_most_needed_head():
    from lighttransfer.analysis.report import layer_scores_from_gates
    from lighttransfer.convert.selection import select_layers

    gates = [[0.1, 0.9], [0.2, 0.3], [0.0, 0.05], [1.0, 0.0]]
    scores = layer_scores_from_gates(gates)
    assert scores == pytest.approx([0.1, 0.7, 0.95, 0.0])
    assert select_layers(scores, ratio=0.5) == [1, 2]  # layer 3 has one head that needs everything


def test_explain_selection_ranks_by_the_score_that_chose():
    lazy = [0.9, 0.8, 0.1, 0.2]  # the lazy ratio would stream layers 0 and 1
    scores = [0.0, 0.1, 0.9, 0.8]  # the gate-derived score streams layers 2 and 3
    rows = explain_selection(num_layers=4, num_kv_heads=2, streaming_layers=[2, 3], lazy_ratios=lazy,
                             scores=scores, score_label="1 - max gate")
    assert [r.rank for r in rows] == [4, 3, 1, 2]
    assert rows[2].reason == "lowest gates" and rows[0].reason == "below the cutoff"
    assert rows[2].to_dict()["score_label"] == "1 - max gate" and rows[2].lazy_ratio == 0.1
    plain = explain_selection(num_layers=4, num_kv_heads=2, streaming_layers=[0, 1], lazy_ratios=lazy)
    assert [r.rank for r in plain] == [1, 2, 4, 3] and "score_label" not in plain[0].to_dict()


def test_full_kv_heads_rank_the_given_layers_and_round_halves_up():
    from lighttransfer.convert import select_full_kv_heads

    scores = [[0.9, 0.1], [0.99, 0.98], [float("nan"), 0.7], [0.6, 0.5]]
    # layer 1 is not among the layers: its high scores do not count; 0.25 x 6 = 1.5 rounds up to 2
    assert select_full_kv_heads(scores, share=0.25, layers=[0, 2, 3]) == {0: [True, False], 2: [False, True]}
    # a head without a score comes last; at least one head is kept
    assert select_full_kv_heads(scores, share=1.0, layers=[2]) == {2: [True, True]}
    assert select_full_kv_heads(scores, share=0.01, layers=[2]) == {2: [False, True]}
    assert select_full_kv_heads(scores, share=0.5, layers=[]) == {}
