"""Calibration: reading sources, one-line errors, deterministic sample cutting, passkey prompts."""

from __future__ import annotations

import json

import pytest
import torch
from lighttransfer.calibration import SHIPPED_TEXT, check_sources, load_calibration, make_passkey_sample
from lighttransfer.calibration.passkey import NEEDLE, QUESTION
from lighttransfer.errors import LightTransferError


class ByteTokenizer:
    """A transformers-like tokenizer over UTF-8 bytes: id = byte + 3; BOS 1 (added by default), EOS 2."""

    bos_token_id = 1
    eos_token_id = 2

    def __init__(self, add_bos: bool = True) -> None:
        self.add_bos = add_bos

    def __call__(self, text, add_special_tokens=True, verbose=True):
        ids = [b + 3 for b in text.encode("utf-8")]
        if add_special_tokens and self.add_bos:
            ids = [self.bos_token_id, *ids]
        return {"input_ids": ids}

    def decode(self, ids) -> str:
        return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")


@pytest.fixture
def tok() -> ByteTokenizer:
    return ByteTokenizer()


def test_txt_rows_start_with_bos_and_come_from_the_text(tmp_path, tok):
    text = "".join(f"line {i:04d} of the book.\n" for i in range(400))
    f = tmp_path / "book.txt"
    f.write_text(text)
    cal = load_calibration(str(f), tok, seq_len=64, samples=5, seed=3)
    assert cal.input_ids.shape == (5, 64) and cal.input_ids.dtype == torch.long
    assert (cal.input_ids[:, 0] == tok.bos_token_id).all()
    for row, offset in zip(cal.input_ids, cal.offsets, strict=True):
        body = tok.decode(row[1:])
        assert body in text and text.encode()[offset : offset + 63].decode() == body
    assert len(set(cal.offsets)) == 5 and all(b - a >= 63 for a, b in zip(cal.offsets, cal.offsets[1:], strict=False))
    assert cal.total_tokens == len(text.encode())


def test_same_seed_same_rows_other_seed_other_rows(tmp_path, tok):
    f = tmp_path / "a.txt"
    f.write_text("word " * 3000)
    f2 = tmp_path / "b.txt"
    f2.write_text("".join(f"{i} " for i in range(3000)))
    a = load_calibration([str(f2)], tok, seq_len=100, samples=4, seed=0)
    b = load_calibration([str(f2)], tok, seq_len=100, samples=4, seed=0)
    c = load_calibration([str(f2)], tok, seq_len=100, samples=4, seed=1)
    assert torch.equal(a.input_ids, b.input_ids) and a.tokens_sha256 == b.tokens_sha256
    assert a.offsets != c.offsets and a.tokens_sha256 != c.tokens_sha256
    assert a.text_sha256 == c.text_sha256


def test_jsonl_dirs_and_globs_join_documents_with_eos(tmp_path, tok):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("alpha " * 20)
    (d / "sub" / "b.jsonl").write_text(
        json.dumps({"body": "beta " * 20}) + "\n\n" + json.dumps({"body": "gamma " * 20}) + "\n"
    )
    (d / "skip.bin").write_bytes(b"\xff\x00")
    cal = load_calibration(str(d), tok, seq_len=40, samples=1, field="body")
    assert [p.rsplit("/", 1)[-1] for p in cal.files] == ["a.txt", "b.jsonl"]
    eos = tok.eos_token_id
    assert cal.total_tokens == 120 + 100 + 120 + 2  # three documents, two EOS separators
    assert (cal.input_ids == eos).sum() <= 2
    globbed = load_calibration(str(d / "**" / "*.jsonl"), tok, seq_len=40, samples=1, field="body")
    assert globbed.total_tokens == 100 + 120 + 1


def test_default_is_the_shipped_text(tok):
    cal = load_calibration(None, tok, seq_len=256, samples=2)
    assert cal.files == [str(SHIPPED_TEXT)]
    assert "Dashwood" in SHIPPED_TEXT.read_text()[:2000]


def _write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", "no such file"),
        ("empty", "is empty"),
        ("latin1", "not UTF-8"),
        ("bad_json", "line 2 is not valid JSON"),
        ("no_field", "has no field 'text'; pass --field"),
        ("empty_dir", "holds no .txt"),
        ("no_glob_match", "matches no file"),
        ("unknown_synthetic", "not a known synthetic source"),
    ],
    ids=lambda x: x if isinstance(x, str) and " " not in x else "",
)
def test_bad_sources_give_one_line(tmp_path, tok, case, expected):
    spec = {
        "missing": lambda: str(tmp_path / "nope.txt"),
        "empty": lambda: _write(tmp_path / "e.txt", b"  \n\n"),
        "latin1": lambda: _write(tmp_path / "l.txt", "caf\u00e9 cr\u00e8me".encode("latin-1")),
        "bad_json": lambda: _write(tmp_path / "b.jsonl", b'{"text": "ok"}\n{text: oops}\n'),
        "no_field": lambda: _write(tmp_path / "n.jsonl", b'{"body": "ok"}\n'),
        "empty_dir": lambda: (tmp_path / "d").mkdir() or str(tmp_path / "d"),
        "no_glob_match": lambda: str(tmp_path / "*.nothing"),
        "unknown_synthetic": lambda: "synthetic:needles",
    }[case]()
    for call in (lambda: check_sources(spec), lambda: load_calibration(spec, tok, seq_len=16, samples=1)):
        with pytest.raises(LightTransferError) as err:
            call()
        message = str(err.value)
        assert expected in message and "\n" not in message


def test_too_few_tokens_says_how_many_and_what_to_pass(tmp_path, tok):
    f = tmp_path / "short.txt"
    f.write_text("x" * 1000)
    with pytest.raises(LightTransferError) as err:
        load_calibration(str(f), tok, seq_len=300, samples=5)
    message = str(err.value)
    assert "1,000 tokens" in message and "enough for 3 sample(s)" in message
    assert "--seq-len" in message and "--samples" in message and "add text" in message
    ok = load_calibration(str(f), tok, seq_len=300, samples=3)
    assert ok.samples == 3


@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0], ids=lambda d: f"depth={d}")
def test_passkey_sample_has_exact_length_and_the_key_at_its_depth(tok, depth):
    filler = SHIPPED_TEXT.read_text()
    sample = make_passkey_sample(tok, filler, length_tokens=900, depth=depth, seed=5)
    ids, answer = sample
    assert ids.shape == (900,) and ids.dtype == torch.long and ids[0] == tok.bos_token_id
    assert len(answer) == 5 and answer.isdigit()
    text = tok.decode(ids)
    needle = NEEDLE.format(key=answer)
    assert text.count(needle) == 1 and text.endswith(QUESTION)
    start = text.index(needle)
    filler_len = len(text) - len(needle) - len(QUESTION) - text.index("\n\n") - 2
    measured = (start - text.index("\n\n") - 2) / filler_len
    assert abs(measured - depth) < 0.01
    again = make_passkey_sample(tok, filler, length_tokens=900, depth=depth, seed=5)
    other = make_passkey_sample(tok, filler, length_tokens=900, depth=depth, seed=6)
    assert torch.equal(again.input_ids, ids) and again.answer == answer
    assert not torch.equal(other.input_ids, ids)


def test_passkey_refuses_bad_depth_and_too_short_length(tok):
    with pytest.raises(LightTransferError, match="between 0 and 1"):
        make_passkey_sample(tok, "filler", length_tokens=500, depth=1.5)
    with pytest.raises(LightTransferError, match="raise --seq-len"):
        make_passkey_sample(tok, "filler", length_tokens=50, depth=0.5)


def test_synthetic_passkey_calibration_spreads_depths(tok):
    cal = load_calibration("synthetic:passkey", tok, seq_len=600, samples=4, seed=2)
    assert cal.input_ids.shape == (4, 600)
    assert sorted(cal.depths) == [0.125, 0.375, 0.625, 0.875]
    texts = [tok.decode(r) for r in cal.input_ids]
    assert all(t.endswith(QUESTION) and "The pass key is" in t for t in texts)
    again = load_calibration("synthetic:passkey", tok, seq_len=600, samples=4, seed=2)
    assert torch.equal(cal.input_ids, again.input_ids)


def test_real_tokenizer_rows(tok):
    """The same cutting with a real BPE tokenizer (SmolLM2's), when the shared assets are present."""
    from conftest import SHARED_ASSETS

    path = SHARED_ASSETS / "smollm2-135m-instruct" / "tokenizer.json"
    if not path.is_file():
        pytest.skip("shared SmolLM2 tokenizer not present")
    from transformers import PreTrainedTokenizerFast

    real = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|im_end|>")
    cal = load_calibration(None, real, seq_len=1024, samples=8, seed=0)
    assert cal.input_ids.shape == (8, 1024)
    assert 50_000 < cal.total_tokens < 120_000
    assert len(real.decode(cal.input_ids[0])) > 2000
