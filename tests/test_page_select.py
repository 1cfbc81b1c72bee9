"""The Quest-like page-bound selection (TokenSelect's evaluation baseline): the bound, the pages it takes, its
budget, the runtime path and the eval rows."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from lighttransfer.errors import LightTransferError
from lighttransfer.hybrid_format import TokenSelectConfig
from lighttransfer.kernels.page_select import page_bounds, page_picks_reference
from lighttransfer.runtime.token_select import SelectionState, SelectionStats, token_select_attention


def test_the_page_bound_is_an_upper_bound_of_every_score_in_the_page():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 3, 100, 8, generator=g)
    q = torch.randn(2, 3, 8, generator=g)
    cand = torch.ones(2, 100, dtype=torch.bool)
    cand[:, :5] = False
    low, high, present = page_bounds(k, cand, 16)
    assert low.shape == (2, 3, 7, 8) and present.all()
    bound = torch.maximum(q.unsqueeze(2) * low, q.unsqueeze(2) * high).sum(-1)  # [B, Hkv, pages]
    scores = torch.einsum("bhd,bhnd->bhn", q, k)
    for j in range(7):
        lo, hi = max(5, 16 * j), min(100, 16 * (j + 1))
        assert (scores[:, :, lo:hi] <= bound[:, :, j:j + 1] + 1e-5).all()
        # tight for a page of one key: the bound is the score
    single, _, _ = page_bounds(k, cand, 1)
    torch.testing.assert_close(torch.maximum(q.unsqueeze(2) * single, q.unsqueeze(2) * single).sum(-1)[:, :, 5:],
                               scores[:, :, 5:])


def test_the_page_with_the_outstanding_key_is_taken_whole():
    """A key aligned with the query in page 3 (keys 48-63): its page wins; every listed key is a candidate and
    the budget is k // page pages."""
    dim, n = 16, 200
    k = 0.1 * torch.randn(1, 1, n, dim, generator=torch.Generator().manual_seed(1))
    q = torch.zeros(1, 2, 1, dim)
    q[..., 0] = 4.0
    k[0, 0, 50, 0] = 3.0
    picks = page_picks_reference(q, k, init=4, local=16, k_select=32, page=16)
    listed = picks[0, 0][picks[0, 0] >= 0]
    assert set(range(48, 64)) <= set(listed.tolist())
    assert len(listed) == 32 and listed.min() >= 4 and listed.max() <= n - 16 - 1 + 0  # candidates only
    assert torch.equal(listed, listed.sort().values)


def test_a_covering_budget_selects_every_candidate():
    k = torch.randn(2, 2, 90, 8, generator=torch.Generator().manual_seed(2))
    q = torch.randn(2, 4, 3, 8, generator=torch.Generator().manual_seed(3))
    start = torch.tensor([0, 7])
    picks = page_picks_reference(q, k, init=3, local=5, k_select=96, page=8, kv_start=start)
    for b in range(2):
        for i in range(3):
            p = 90 - 3 + i
            want = list(range(int(start[b]) + 3, p + 1 - 5))
            got = picks[b, i][picks[b, i] >= 0].tolist()
            assert got == want


def test_the_runtime_attends_the_listed_pages_and_reuses_them():
    config = TokenSelectConfig(k=32, init=4, local=16, reuse=0.9, score="pages", page=16)
    g = torch.Generator().manual_seed(4)
    k, v = torch.randn(1, 2, 300, 16, generator=g), torch.randn(1, 2, 300, 16, generator=g)
    q = torch.randn(1, 4, 1, 16, generator=g)
    state, stats = SelectionState(), SelectionStats()
    out = token_select_attention(q, k, v, config=config, state=state, stats=stats, kv_start=None, scale=None)
    assert out.shape == (1, 4, 1, 16) and state.picked.shape == (1, 32)
    picks = state.picked[0][state.picked[0] >= 0]
    assert len(picks) == 32 and all(int(t) // 16 in {int(u) // 16 for u in picks} for t in picks)
    assert len({int(t) // 16 for t in picks}) == 2  # two whole pages
    token_select_attention(q, k[:, :, :301 - 1], v[:, :, :300], config=config, state=state, stats=stats,
                           kv_start=None, scale=None)
    assert stats.hits == 1  # the same query: the Selection Cache reuses the pages


def test_pages_are_an_evaluation_baseline_only():
    paged = TokenSelectConfig(k=32, score="pages", page=16)
    assert "Quest-like" in paged.describe() and "2 pages of 16" in paged.describe()
    with pytest.raises(LightTransferError, match="not stored in a checkpoint"):
        paged.to_fields()
    with pytest.raises(LightTransferError, match="page size"):
        TokenSelectConfig(k=8, score="pages", page=16)
    with pytest.raises(LightTransferError, match="tokens or pages"):
        TokenSelectConfig(score="blocks")
    assert TokenSelectConfig(k=8).page == 16  # the default page does not constrain a token-scored k
    with pytest.raises(LightTransferError, match="dynamic decode steps"):
        token_select_attention(torch.zeros(1, 2, 1, 8), torch.zeros(1, 1, 64, 8), torch.zeros(1, 1, 64, 8),
                               config=paged, state=SelectionState(), stats=None, kv_start=None, scale=None,
                               n_valid=torch.tensor([40]))


def test_eval_runs_the_quest_rows(tmp_path, capsys, long_text, monkeypatch):
    from test_eval import eval_inputs

    model_dir, text = eval_inputs(tmp_path, long_text, monkeypatch)
    out = tmp_path / "res.json"
    base = ["eval", "--baseline", str(model_dir), "--text", str(text), "--report", "r.json", "--lengths", "96",
            "--windows", "1", "--passkey-lengths", "256", "--passkey-depths", "2", "--passkey-trials", "1",
            "--sink", "2", "--window", "16", "--ratio", "0.5", "--select-k", "8", "--select-init", "2",
            "--select-local", "8", "--device", "cpu", "-q"]
    code, _, err = run_cli(base + ["--rows", "original,tokenselect,quest,lighttransfer+quest", "--select-page", "4",
                                   "--out", str(out)], capsys)
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["quest"]["selection"]["score"] == "pages" and rows["quest"]["selection"]["page"] == 4
    assert "score" not in rows["tokenselect"]["selection"]
    assert rows["quest"]["selection_cache"]["lookups"] > 0
    assert rows["lighttransfer+quest"]["streaming_layers"] == [0, 2]
    assert rows["quest"]["perplexity"] != rows["tokenselect"]["perplexity"]
    code, _, err = run_cli(base + ["--rows", "quest", "--select-page", "9", "--out", str(tmp_path / "bad.json")],
                           capsys)
    assert code != 0 and "--select-page must be in [1, --select-k = 8]" in err and "Traceback" not in err

