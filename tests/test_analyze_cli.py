"""``lighttransfer analyze`` end to end on a tiny model directory, and its one-line errors."""

from __future__ import annotations

import json

import pytest
from conftest import make_tiny_model
from conftest import run_cli as run
from lighttransfer.analysis.report import AnalysisReport


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama (vocab 256) saved with a byte-level tokenizer whose 256 tokens are its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny-llama-tok")
    make_tiny_model("llama").save_pretrained(d)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(d)
    return d


@pytest.fixture
def book(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("It is a truth universally acknowledged, that a single man in possession of a good "
                    "fortune, must be in want of a wife.\n" * 20)
    return path


SMALL = ["--seq-len", "128", "--samples", "3", "--sink", "2", "--recent", "16", "--last", "8"]


def test_analyze_writes_report_and_heatmap(tiny_dir, book, tmp_path, capsys):
    out, plot = tmp_path / "out" / "report.json", tmp_path / "heat.png"
    code, stdout, stderr = run(["analyze", str(tiny_dir), "--calib", str(book), *SMALL, "--batch", "2",
                                "--out", str(out), "--plot", str(plot)], capsys)
    assert code == 0, stderr
    report = AnalysisReport.load(out)
    assert report.num_layers == 4 and report.params["samples"] == 3 and report.params["batch"] == 2
    assert report.calibration["files"] == [str(book)]
    assert plot.read_bytes()[:4] == b"\x89PNG"
    for layer in range(4):
        assert f"{report.layer_lazy_ratios()[layer]:.3f} \u00b1" in stdout
    assert json.loads(out.read_text())["schema_version"] == 1


def test_files_listed_after_calib_are_all_read(tiny_dir, book, tmp_path, capsys):
    second = tmp_path / "second.jsonl"
    second.write_text(json.dumps({"body": "Emma Woodhouse, handsome, clever, and rich. " * 10}) + "\n")
    out = tmp_path / "r.json"
    code, _, stderr = run(["analyze", str(tiny_dir), "--calib", str(book), str(second), "--field", "body",
                           *SMALL, "--out", str(out), "-q"], capsys)
    assert code == 0, stderr
    assert AnalysisReport.load(out).calibration["files"] == [str(book), str(second)]


def _latin1(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\u00e9".encode("latin-1"))
    return str(path)


def _empty(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    return str(path)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (lambda t, b: ["--calib", str(t / "missing.txt")], "no such file"),
        (lambda t, b: ["--calib", _empty(t)], "is empty"),
        (lambda t, b: ["--calib", _latin1(t)], "not UTF-8"),
        (lambda t, b: ["--calib", str(b), "--samples", "50"], "tokens, enough for"),
        (lambda t, b: ["--calib", str(b), "--seq-len", "4096"], "beyond the model's 2048 positions"),
        (lambda t, b: ["--calib", str(b), "--recent", "200"], "not longer than --sink + --window"),
        (lambda t, b: ["--calib", str(b), "--plot", str(t / "heat.jpg")], "must end with .png"),
        (lambda t, b: [str(b)], "calibration files go after --calib"),
    ],
    ids=["missing", "empty", "not-utf8", "too-few-tokens", "seq-len-too-long", "window-covers-all",
         "plot-suffix", "stray-argument"],
)
def test_errors_are_one_line_and_leave_nothing_behind(tiny_dir, book, tmp_path, capsys, args, expected):
    out = tmp_path / "never.json"
    base = ["--seq-len", "128", "--samples", "3", "--sink", "2", "--recent", "16", "--last", "8"]
    code, _, stderr = run(["analyze", str(tiny_dir), *base, *args(tmp_path, book), "--out", str(out)], capsys)
    assert code == 1
    assert expected in stderr and "Traceback" not in stderr
    assert stderr.strip().count("\n") == 0
    assert not out.exists()


def test_help_lists_the_options(capsys):
    code, stdout, _ = run(["analyze", "--help"], capsys)
    assert code == 0
    for option in ("--calib", "--seq-len", "--samples", "--batch", "--sink", "--window", "--last", "--out",
                   "--plot", "--threshold", "--seed", "--field", "--device", "--dtype", "--trust-remote-code"):
        assert option in stdout
    assert "--recent" not in stdout  # the old name of --window still works (SMALL uses it) but is not shown
