"""The recovery benchmark's columns: the gap recovered against the untrained original, and against the control
(the original fine-tuned the same way), for perplexity and passkey accuracy."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "scripts" / "finetune_recovery.py"


def _script():
    spec = importlib.util.spec_from_file_location("finetune_recovery", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(ppl4k, acc):
    return {"ppl": {"4096": ppl4k}, "passkey": {"accuracy": acc}}


def test_recovery_against_the_control_separates_adaptation_from_recovery():
    rows = {"original": _row(26.0, 0.9), "hybrid": _row(28.0, 0.3),
            # both models adapt to the text by 3 points; the hybrid's fine-tune closes half of the conversion's gap
            "s2_100": _row(24.0, 0.5), "reference_s2_100": _row(23.0, 0.9),
            "dense_100": _row(25.0, 0.3)}  # no control of its own
    _script().add_recovery(rows)
    s2 = rows["s2_100"]
    assert s2["gap_recovered"]["4096"] == pytest.approx(2.0)  # against the untrained original: looks like 200%
    assert s2["control"] == "reference_s2_100"
    assert s2["gap_recovered_vs_control"]["4096"] == pytest.approx(0.5)  # 1 - (24 - 23) / (28 - 26)
    assert s2["passkey_gap_recovered_vs_control"] == pytest.approx(1 - (0.9 - 0.5) / (0.9 - 0.3))
    assert "control" not in rows["dense_100"] and rows["dense_100"]["gap_recovered"]["4096"] == pytest.approx(1.5)
    assert "control" not in rows["reference_s2_100"]  # a control is not read against itself
    assert "gap_recovered" not in rows["original"] and "gap_recovered" not in rows["hybrid"]


def test_no_gap_gives_none_rather_than_a_division_by_zero():
    rows = {"original": _row(26.0, 0.9), "hybrid": _row(26.0, 0.9), "s2_50": _row(25.0, 0.9),
            "reference_s2_50": _row(25.0, 0.9)}
    _script().add_recovery(rows)
    assert rows["s2_50"]["gap_recovered"]["4096"] is None
    assert rows["s2_50"]["gap_recovered_vs_control"]["4096"] is None
    assert rows["s2_50"]["passkey_gap_recovered_vs_control"] is None


def _wordings(ppl4k, locker, needle):
    row = _row(ppl4k, locker)
    row["retrieval"] = {"locker": {"accuracy": locker}, "needle": {"accuracy": needle}}
    return row


def test_each_wording_is_read_against_its_own_control():
    rows = {"original": _wordings(26.0, 0.9, 0.5), "hybrid": _wordings(28.0, 0.3, 0.1),
            "s2_100": _wordings(24.0, 0.3, 0.4), "reference_s2_100": _wordings(23.0, 0.9, 0.5)}
    _script().add_recovery(rows)
    got = rows["s2_100"]["retrieval_gap_recovered_vs_control"]
    assert got["locker"] == pytest.approx(0.0)  # 1 - (0.9 - 0.3) / (0.9 - 0.3): nothing back
    assert got["needle"] == pytest.approx(1 - (0.5 - 0.4) / (0.5 - 0.1))
    assert rows["s2_100"]["passkey_gap_recovered_vs_control"] == pytest.approx(got["locker"])
