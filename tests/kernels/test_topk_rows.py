"""The radix-select top-k (TokenSelect's, skipping Selection Cache hits) against ``torch.topk``: the same sets of
values (and indices where nothing ties), awkward lengths, k at its bounds, -inf tails, ties, negative values, NaN,
and rows flagged to skip left untouched; and its fixed layout (the keys above the k-th in ascending index order,
then the lowest-index ties), the same on every run."""

from __future__ import annotations

import re

import pytest
import torch
from kernel_error_policy import DEVICE
from lighttransfer.errors import LightTransferError
from lighttransfer.kernels.topk_rows import topk_rows, topk_rows_reference


def _sorted(t: torch.Tensor) -> torch.Tensor:
    return torch.sort(t, dim=-1).values


def _votes(rows, n, seed, *, neg_inf_share=0.0, negative=False):
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(rows, n, generator=g) * 4.0
    if negative:
        v = v - 2.0
    if neg_inf_share:
        v = v.masked_fill(torch.rand(rows, n, generator=g) < neg_inf_share, float("-inf"))
    return v.to(DEVICE)


@pytest.mark.parametrize("rows, n, k", [(1, 1, 1), (1, 70, 1), (3, 70, 70), (2, 300, 17), (5, 1000, 128),
                                        (1, 4099, 2048)],
                         ids=["N1", "k1", "k=N", "N300", "B5-N1000", "N4099-k2048"])
def test_the_same_sets_as_torch_topk(rows, n, k):
    votes = _votes(rows, n, seed=n + k)
    values, indices = topk_rows(votes, k)
    want_v, want_i = topk_rows_reference(votes, k)
    assert values.shape == indices.shape == (rows, k) and indices.dtype == torch.long
    torch.testing.assert_close(_sorted(values), _sorted(want_v), atol=0, rtol=0)
    assert torch.equal(_sorted(indices), _sorted(want_i))  # continuous random votes: no ties
    assert torch.equal(torch.gather(votes, 1, indices), values)


def test_neg_inf_tails_negative_values_and_nan_order_as_torch_does():
    votes = _votes(4, 500, seed=2, neg_inf_share=0.9, negative=True)  # ~50 finite per row, k beyond them
    votes[1, 7] = float("nan")
    votes[2, 3] = float("inf")
    values, _ = topk_rows(votes, 80)
    want, _ = topk_rows_reference(votes, 80)
    assert torch.equal(_sorted(values).nan_to_num(7.0), _sorted(want).nan_to_num(7.0))
    assert torch.isnan(values[1]).sum() == 1 and (values[2] == float("inf")).sum() == 1


def test_ties_at_the_kth_value_fill_exactly_k_slots():
    votes = torch.zeros(2, 200, device=DEVICE)
    votes[:, :10] = 5.0  # 10 certain, then 190 tied for 20 slots
    values, indices = topk_rows(votes, 30)
    assert torch.equal(_sorted(values), _sorted(topk_rows_reference(votes, 30)[0]))
    for row in indices:  # the ties go to the lowest indices, in order
        assert row.tolist() == list(range(30))


def _layout(votes: torch.Tensor, k: int) -> torch.Tensor:
    """The indices in the kernel's documented layout: keys above the k-th value ascending, then the lowest-index
    keys equal to it (finite votes)."""
    out = []
    for row in votes.cpu():
        kth = torch.topk(row, k).values[-1]
        above = torch.nonzero(row > kth).flatten()
        ties = torch.nonzero(row == kth).flatten()[: k - above.numel()]
        out.append(torch.cat([above, ties]))
    return torch.stack(out).to(votes.device)


@pytest.mark.parametrize("rows, n, k, levels", [(1, 4099, 2048, 0), (3, 1000, 128, 0), (2, 3000, 700, 9),
                                                (4, 257, 64, 3)],
                         ids=["N4099-k2048", "B3-N1000", "B2-ties", "B4-many-ties"])
def test_the_layout_is_fixed_ascending_with_the_lowest_ties_and_repeats(rows, n, k, levels):
    """Positions, not only sets: the list built from them (and the attention summed over it in that order) must
    not depend on which program claims its slots first."""
    votes = _votes(rows, n, seed=n + k)
    if levels:  # few distinct values: long runs of ties across chunks
        votes = (votes * levels).floor()
    values, indices = topk_rows(votes, k)
    assert torch.equal(indices, _layout(votes, k))
    assert torch.equal(values, torch.gather(votes, 1, indices))
    for _ in range(3):
        again_v, again_i = topk_rows(votes, k)
        assert torch.equal(again_i, indices) and torch.equal(again_v, values)


def test_skipped_rows_are_left_unwritten_and_the_others_exact():
    votes = _votes(4, 300, seed=9)
    skip = torch.tensor([True, False, True, False], device=DEVICE)
    values, indices = topk_rows(votes, 20, skip=skip)
    want_v, want_i = topk_rows_reference(votes, 20)
    for r in (1, 3):
        assert torch.equal(_sorted(indices[r]), _sorted(want_i[r]))
    if DEVICE == "cpu" and not _interpreted():
        return
    # the Triton path reads nothing for a skipped row: run it on poisoned votes, the kept rows stay exact
    poisoned = votes.clone()
    poisoned[skip] = float("nan")
    _, again = topk_rows(poisoned, 20, skip=skip)
    assert torch.equal(again[1], indices[1]) and torch.equal(again[3], indices[3])


def _interpreted() -> bool:
    from lighttransfer.kernels.switch import triton_runs_on

    return triton_runs_on(torch.zeros(1))


@pytest.mark.parametrize("args, message", [
    (dict(votes=torch.zeros(3)), "votes must be float32 [rows, N]"),
    (dict(votes=torch.zeros(2, 5, dtype=torch.float16)), "votes must be float32 [rows, N]"),
    (dict(k=0), "k must be in [1, N = 5]"),
    (dict(k=6), "k must be in [1, N = 5]"),
    (dict(skip=torch.zeros(3, dtype=torch.bool)), "skip must be [rows] = [2]"),
], ids=["1d", "fp16", "k0", "k-above-N", "skip"])
def test_bad_input_is_one_clear_error(args, message):
    call = dict(votes=torch.zeros(2, 5), k=2, skip=None)
    call.update(args)
    with pytest.raises(LightTransferError, match=re.escape(message)):
        topk_rows(call["votes"], call["k"], skip=call["skip"])


def test_fresh_selection_lists_the_same_keys_with_either_top_k(monkeypatch):
    """TokenSelect's list kernel after the radix select: the same keys as after torch.topk, hits keeping their
    cached picks (the radix select leaves their rows unwritten)."""
    import lighttransfer.kernels.token_select as kts

    g = torch.Generator().manual_seed(4)
    votes = torch.rand(3, 400, generator=g).to(DEVICE)
    votes[:, :8] = float("-inf")  # init and recent keys are not candidates
    votes[:, -16:] = float("-inf")
    hit = torch.tensor([False, True, False], device=DEVICE)
    cached = torch.arange(3 * 32, device=DEVICE).view(3, 32) + 10
    lists = {}
    for topk in ("torch", "radix"):
        monkeypatch.setattr(kts, "TOPK", topk)
        picked, idx = kts.fresh_selection(votes, k_select=32, init=8, local=16, hit=hit, cached=cached,
                                          anchor_pos=torch.full((3,), 395, device=DEVICE), extra=4)
        lists[topk] = (picked.sort(-1).values, idx.sort(-1).values)
    assert torch.equal(lists["torch"][0], lists["radix"][0]) and torch.equal(lists["torch"][1], lists["radix"][1])
    assert torch.equal(lists["radix"][0][1], cached[1])
