"""Training rows: whole rows of text in a seeded order that a resumed run repeats, and synthetic passkey rows
whose answer ends the row, in the training wordings only."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import CALIB_TEXT, SHARED_ASSETS
from lighttransfer.errors import LightTransferError
from lighttransfer.training.data import load_training_data
from test_runtime_reference import word_tokenizer


def test_rows_are_whole_and_every_epoch_is_a_permutation(tmp_path):
    (tmp_path / "a.txt").write_text(" ".join(f"w{3 + i % 200}" for i in range(1000)))
    data = load_training_data([str(tmp_path / "a.txt")], word_tokenizer(), seq_len=64, seed=3)
    assert data.rows.shape == (1000 // 64, 64)
    assert data.passkey_rows == 0
    first_epoch = torch.cat([data.batch(s, 3) for s in range(5)])[: data.num_rows]
    assert sorted(map(tuple, first_epoch.tolist())) == sorted(map(tuple, data.rows.tolist()))
    again = load_training_data([str(tmp_path / "a.txt")], word_tokenizer(), seq_len=64, seed=3)
    assert torch.equal(again.batch(7, 3), data.batch(7, 3))  # step 7 is the same rows in a resumed run
    other = load_training_data([str(tmp_path / "a.txt")], word_tokenizer(), seq_len=64, seed=4)
    assert not torch.equal(other.batch(0, 8), data.batch(0, 8))
    assert data.to_dict()["tokens_sha256"] == again.to_dict()["tokens_sha256"]


@pytest.mark.parametrize("sources,message", [
    (["synthetic:passkey"], "pass at least one .txt"),
    (["{a}", "synthetic:needles"], "not a known synthetic source"),
    ([], "pass at least one"),
])
def test_bad_sources(tmp_path, sources, message):
    (tmp_path / "a.txt").write_text("w3 w4 " * 100)
    with pytest.raises(LightTransferError, match=message):
        load_training_data([s.format(a=tmp_path / "a.txt") for s in sources], word_tokenizer(), seq_len=16)
    with pytest.raises(LightTransferError, match="needs synthetic:passkey"):
        load_training_data([str(tmp_path / "a.txt")], word_tokenizer(), seq_len=16, passkey_count=2)


def test_passkey_rows_end_with_their_key_in_the_training_wordings():
    model_dir = SHARED_ASSETS / "smollm2-135m-instruct"
    if not (model_dir / "tokenizer.json").is_file():
        pytest.skip("needs the SmolLM2 tokenizer from ../shared/assets")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    data = load_training_data([str(CALIB_TEXT), "synthetic:passkey"], tok, seq_len=256, passkey_count=6)
    assert data.passkey_rows == 6 and data.rows.shape[1] == 256
    for row in data.rows[-6:]:
        text = tok.decode(row)
        key = re.search(r"(\d{5})\s*$", text).group(1)
        assert text.count(key) >= 2  # hidden in the needle, answered at the end
        assert "blue door" not in text and "locker" not in text.lower()  # held-out wordings stay out
    default = load_training_data([str(CALIB_TEXT), "synthetic:passkey"], tok, seq_len=256)
    assert default.passkey_rows == max(1, (default.num_rows - default.passkey_rows) // 4)
