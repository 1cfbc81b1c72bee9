"""The quality script's comparison against dense: perplexity %, points, paired flips, and its table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "scripts" / "sparse_prefill_quality.py"


def _script():
    spec = importlib.util.spec_from_file_location("sparse_prefill_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(name, ppl, passkey, ruler, density=None):
    return {"name": name, "perplexity": {"8192": {"ppl": ppl}}, "seconds": 1.0,
            "passkey": {"accuracy": sum(passkey) / len(passkey), "outcomes": passkey},
            "ruler": {"average": sum(ruler) / len(ruler), "outcomes": ruler, "by_task": {}},
            **({"sparse_prefill_density": {"mean": density}} if density is not None else {})}


def test_comparison_is_paired_against_the_dense_row():
    q = _script()
    dense = _row("original", 10.0, [True, True, False, True], [100.0, 0.0, 50.0])
    sparse = _row("sparse", 10.2, [True, False, True, True], [100.0, 100.0, 0.0], density=0.4)
    base, got = q.compare([dense, sparse], 8192)
    assert base["ppl_vs_dense_pct"] == 0 and got["ppl_vs_dense_pct"] == pytest.approx(2.0)
    assert got["passkey_vs_dense_points"] == 0 and got["passkey_flips"] == {"lost": 1, "gained": 1, "n": 4}
    assert got["ruler_vs_dense_points"] == pytest.approx(50 / 3) and got["ruler_flips"]["lost"] == 1
    md = q.to_markdown({"environment": {"gpu": "GPU X", "torch": "2", "triton": "3", "cuda": "12"}, "seconds": 5,
                        "settings": {"model": "m.gguf", "length": 8192, "block": 64, "min_len": 4096,
                                     "gqa_lists": "query"},
                        "density_vs_alpha": [{"method": "sample", "alpha": 0.9, "mean_density": 0.4, "min_layer": 0.2,
                                              "max_layer": 0.8}],
                        "comparison": [base, got]})
    assert "GPU X" in md and "+2.00%" in md and "(1/1 of 3)" in md
