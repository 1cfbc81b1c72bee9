"""Issue #16: bad and hostile inputs a new user tried. One test per class of input, parametrized over its cases;
each case ends in one line naming the file or option and what to do, exit status 1, no traceback, nothing left
behind (or, where the input is legitimate, in a warning and a result)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHARED_GGUF, make_tiny_model
from conftest import run_cli as run
from lighttransfer.errors import LightTransferError
from lighttransfer.hybrid_format import HybridConfig
from safetensors.torch import load_file, save_file
from test_runtime_reference import word_tokenizer

WORDS = " ".join(f"w{3 + (i * 7) % 250}" for i in range(4000))


def _save(model, d: Path) -> Path:
    model.save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory) -> Path:
    """The tiny Llama (seed 0) with a word tokenizer."""
    return _save(make_tiny_model("llama"), tmp_path_factory.mktemp("good"))


@pytest.fixture(scope="module")
def words_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(WORDS)
    return path


def _flat(text: str) -> str:
    return " ".join(text.split())


def _one_clean_line(code: int, err: str) -> None:
    assert code == 1, err
    assert "Traceback" not in err and "unexpected " not in err, err
    assert err.strip().count("\n") <= 2, err  # one line (rich may wrap it), a warning at most before it


# ---- 1. broken weights ----------------------------------------------------------------------------------------

def _edit_weights(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    path = dst / "model.safetensors"
    state = load_file(path)
    edit(state, path)
    return dst


def _drop(state, path):
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, path, metadata={"format": "pt"})


def _reshape(state, path):
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 64)
    save_file(state, path, metadata={"format": "pt"})


def _extra(state, path):
    state["model.layers.0.adapter.weight"] = torch.zeros(4, 4)
    save_file(state, path, metadata={"format": "pt"})


def _truncate(state, path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(state, path):
    path.write_bytes(b"\xff" * 64 + os.urandom(256))


BROKEN = {"missing-tensor": (_drop, "lack 1 tensor"), "shape-mismatch": (_reshape, "does not fit"),
          "unexpected-tensor": (_extra, "does not use"), "truncated": (_truncate, "corrupt or truncated"),
          "garbage": (_garbage, "corrupt or truncated")}
COMMANDS = {"analyze": lambda d, o: ["analyze", d, "--seq-len", "64", "--samples", "1", "--window", "16", "--last", "4"],
            "convert-layers": lambda d, o: ["convert", d, "--layers", "1", "--out", o],
            "generate": lambda d, o: ["generate", d, "--prompt", "w5 w6", "--online-ratio", "0.5"]}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_weights_are_refused_naming_the_file(case, command, good_dir, tmp_path, capsys):
    edit, fragment = BROKEN[case]
    broken = _edit_weights(good_dir, tmp_path / "broken", edit)
    out = tmp_path / "out"
    code, _, err = run([*COMMANDS[command](str(broken), str(out)), "--device", "cpu"], capsys)
    _one_clean_line(code, err)
    assert fragment in err and str(broken) in err.replace("\n", ""), err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


@pytest.mark.skipif(not SHARED_GGUF.is_file(), reason="needs the shared GGUF file")
def test_a_truncated_gguf_is_named(tmp_path, capsys):
    bad = tmp_path / "cut.gguf"
    with SHARED_GGUF.open("rb") as f:
        bad.write_bytes(f.read(4 * 1024 * 1024))
    code, _, err = run(["convert", str(bad), "--layers", "1", "--out", str(tmp_path / "out")], capsys)
    _one_clean_line(code, err)
    assert "cut.gguf" in err and "corrupt or truncated" in err


def test_tied_weights_are_not_missing(tmp_path):
    from lighttransfer.loading import load_model

    d = _save(make_tiny_model("llama", tie_word_embeddings=True), tmp_path / "tied")
    assert "lm_head.weight" not in load_file(d / "model.safetensors")
    assert load_model(d, device="cpu", with_tokenizer=False).model.lm_head.weight is not None


# ---- 2. models that do not fit ----------------------------------------------------------------------------------

def _bert(d: Path) -> Path:
    from transformers import AutoConfig, AutoModelForMaskedLM

    cfg = AutoConfig.for_model("bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, vocab_size=256, max_position_embeddings=128)
    AutoModelForMaskedLM.from_config(cfg).save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    return d


def _gpt2(d: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=256)
    model = AutoModelForCausalLM.from_config(cfg)
    HybridConfig(num_layers=2, num_kv_heads=2, streaming_layers=[1], sink=2, window=8).attach(model.config)
    return _save(model, d)


UNFIT = {
    "bert-analyze": (_bert, ["analyze", "{d}", "--seq-len", "64", "--samples", "1", "--window", "16"], "encoder"),
    "bert-convert": (_bert, ["convert", "{d}", "--layers", "1", "--out", "{o}"], "encoder"),
    "gpt2-prompt-past-positions": (_gpt2, ["generate", "{d}", "--prompt", " ".join(["w9"] * 80),
                                           "--max-new-tokens", "4"], "beyond the model's 64 positions"),
    "window-covers-positions": (None, ["convert", "{d}", "--layers", "1", "--window", "2048", "--out", "{o}"],
                                "covers all 2048 positions"),
}


@pytest.mark.parametrize("case", list(UNFIT))
def test_unfit_models_are_refused(case, good_dir, tmp_path, capsys):
    make, argv, fragment = UNFIT[case]
    d = make(tmp_path / "model") if make else good_dir
    out = tmp_path / "out"
    code, _, err = run([a.format(d=d, o=out) for a in argv] + ["--device", "cpu"], capsys)
    _one_clean_line(code, err)
    assert fragment in _flat(err), err
    assert not out.exists()


def test_a_prompt_past_rotary_positions_is_warned_about(tmp_path, capsys):
    model = make_tiny_model("llama", max_position_embeddings=32)
    HybridConfig(num_layers=4, num_kv_heads=2, streaming_layers=[1], sink=2, window=8).attach(model.config)
    d = _save(model, tmp_path / "short")
    code, _, err = run(["generate", str(d), "--prompt", " ".join(["w9"] * 40), "--max-new-tokens", "2",
                        "--device", "cpu"], capsys)
    assert code == 0 and "beyond the model's 32 positions" in _flat(err), err


def test_convert_fits_the_calibration_length_to_the_model(tmp_path, words_file, capsys):
    """The README's one-step example on a model of fewer than 4096 positions: --seq-len follows the model."""
    model = make_tiny_model("llama", max_position_embeddings=256)
    d = _save(model, tmp_path / "p256")
    code, _, err = run(["convert", str(d), "--calib", str(words_file), "--ratio", "0.5", "--window", "60",
                        "--samples", "1", "--out", str(tmp_path / "out"), "--device", "cpu", "-q"], capsys)
    assert code == 0, err
    calibration = json.loads((tmp_path / "out" / "config.json").read_text())["lighttransfer"]["calibration"]
    assert calibration["seq_len"] == 256


# ---- 3. same-shape mix-ups --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def other_dir(tmp_path_factory) -> Path:
    """The same shape as ``good_dir``, other weights (a 'fine-tune')."""
    return _save(make_tiny_model("llama", seed=1), tmp_path_factory.mktemp("other"))


def _report_for(d: Path, path: Path) -> Path:
    from lighttransfer.analysis import analyze

    report = analyze(str(d), calib=str(path.parent / "words.txt"), seq_len=64, samples=1, sink=2, window=16,
                     last=4, device="cpu")
    report.save(path)
    return path


def _case_report(good, other, tmp, words):
    shutil.copy(words, tmp / "words.txt")
    report = _report_for(other, tmp / "other.json")
    return ["convert", str(good), "--report", str(report), "--sink", "2", "--window", "16", "--out", str(tmp / "out")]


def _case_eval_hybrid(good, other, tmp, words):
    from lighttransfer.convert import convert

    hybrid = convert(str(other), out=tmp / "hyb", layers=[1], sink=2, window=16).out
    return ["eval", str(hybrid), "--baseline", str(good), "--text", str(words), "--lengths", "64",
            "--windows", "1", "--passkey-lengths", "", "--out", str(tmp / "out" / "e.json")]


def _case_eval_report(good, other, tmp, words):
    shutil.copy(words, tmp / "words.txt")
    report = _report_for(other, tmp / "other.json")
    return ["eval", "--baseline", str(good), "--report", str(report), "--text", str(words), "--lengths", "64",
            "--windows", "1", "--passkey-lengths", "", "--sink", "2", "--window", "16",
            "--out", str(tmp / "out" / "e.json")]


def _case_reordered(good, other, tmp, words):
    import lighttransfer

    model = lighttransfer.load(str(good), head_masks={1: [True, False]}, sink=2, window=16, device="cpu")
    model.save_pretrained(tmp / "saved")
    word_tokenizer().save_pretrained(tmp / "saved")
    assert json.loads((tmp / "saved" / "config.json").read_text())["lighttransfer"]["head_order"] == {"1": [1, 0]}
    return ["convert", str(tmp / "saved"), "--layers", "0", "--out", str(tmp / "out")]


MIXUPS = {"report-of-a-fine-tune": (_case_report, "other weights"),
          "eval-hybrid-of-a-fine-tune": (_case_eval_hybrid, "not from baseline"),
          "eval-report-of-a-fine-tune": (_case_eval_report, "not for baseline"),
          "reconvert-reordered-heads": (_case_reordered, "reordered")}


@pytest.mark.parametrize("case", list(MIXUPS))
def test_same_shape_mixups_are_refused(case, good_dir, other_dir, words_file, tmp_path, capsys):
    make, fragment = MIXUPS[case]
    argv = make(good_dir, other_dir, tmp_path, words_file)
    code, _, err = run([*argv, "--device", "cpu"], capsys)
    _one_clean_line(code, err)
    assert fragment in _flat(err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ["gpt_neox", "qwen2"])
def test_fingerprint_from_files_matches_the_loaded_model(arch, tmp_path):
    """GPT-NeoX's file names its head embed_out, transformers lm_head: the value digests do not depend on names."""
    from lighttransfer.loading import fingerprint_from_config, load_config, load_model, resolve_model_source

    d = tmp_path / arch
    make_tiny_model(arch).save_pretrained(d)
    source = resolve_model_source(d)
    assert fingerprint_from_config(load_config(source), source) == \
        load_model(d, device="cpu", with_tokenizer=False).fingerprint


def test_fingerprint_sees_weights_not_dtype_and_agrees_with_the_files(good_dir, other_dir):
    from lighttransfer.loading import (
        compare_fingerprints,
        fingerprint_from_config,
        load_config,
        load_model,
        resolve_model_source,
    )

    good = load_model(good_dir, device="cpu", dtype=torch.bfloat16, with_tokenizer=False).fingerprint
    other = load_model(other_dir, device="cpu", with_tokenizer=False).fingerprint
    source = resolve_model_source(good_dir)
    assert fingerprint_from_config(load_config(source), source) == good != other
    assert compare_fingerprints(good.split("-")[0], good) == "legacy"  # reports written before: still readable
    assert compare_fingerprints(other, good) == "different"


# ---- 4. output failures come before the work ------------------------------------------------------------------

@pytest.fixture
def read_only(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    yield folder
    folder.chmod(0o700)


OUTPUTS = {
    "eval-read-only": lambda d, w, ro: ["eval", "--baseline", str(d), "--text", str(w), "--out", str(ro / "e.json")],
    "bench-read-only": lambda d, w, ro: ["bench", "--baseline", str(d), "--out", str(ro / "b.json")],
    "eval-out-is-a-file": lambda d, w, ro: ["eval", "--baseline", str(d), "--text", str(w), "--out", str(w)],
    "bench-out-under-a-file": lambda d, w, ro: ["bench", "--baseline", str(d), "--out", str(w / "b.json")],
}
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.skipif(ROOT and "read-only" in c,
                                                                           reason="root writes anywhere"))
                                  for c in OUTPUTS])
def test_output_paths_are_checked_before_the_work(case, good_dir, words_file, read_only, capsys, monkeypatch):
    import lighttransfer.loading as loading

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(loading, "load_model", no_load)
    code, _, err = run([*OUTPUTS[case](good_dir, words_file, read_only), "--device", "cpu"], capsys)
    _one_clean_line(code, err)
    assert "--out" in err


def test_output_paths_are_checked_before_the_work_as_root_too(good_dir, words_file, tmp_path, capsys, monkeypatch):
    """(the read-only cases above are skipped for root; a directory in place of a file is refused for anyone)"""
    import lighttransfer.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    (tmp_path / "b.json").mkdir()
    code, _, err = run(["bench", "--baseline", str(good_dir), "--out", str(tmp_path / "b.json")], capsys)
    _one_clean_line(code, err)
    assert "is a directory" in err


def test_a_failed_report_write_keeps_the_analysis(good_dir, words_file, tmp_path, capsys, monkeypatch):
    from lighttransfer.analysis.report import AnalysisReport
    from lighttransfer.output_files import write_error

    real_save = AnalysisReport.save

    def full_disk(self, path):
        if Path(path).parent == tmp_path:
            raise write_error(path, OSError(28, "No space left on device"))
        return real_save(self, path)

    monkeypatch.setattr(AnalysisReport, "save", full_disk)
    code, out, err = run(["analyze", str(good_dir), "--calib", str(words_file), "--seq-len", "64", "--samples", "1",
                          "--window", "16", "--last", "4", "--out", str(tmp_path / "r.json"), "--device", "cpu"],
                         capsys)
    _one_clean_line(code, err)
    assert "lazy ratio per layer" in out and "No space left" in err
    spare = Path(err.replace("\n", "").split("saved to '")[1].split("'")[0])
    assert AnalysisReport.load(spare).num_layers == 4
    spare.unlink()


def test_sigterm_during_convert_leaves_nothing_behind(good_dir, tmp_path):
    out = tmp_path / "out"
    code = (f"import sys, os, signal, time; sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})\n"
            "import lighttransfer.convert.writer as w\n"
            "real = w.write_weights\n"
            "def slow(*a, **k):\n"
            "    r = real(*a, **k); print('writing', flush=True); time.sleep(30); return r\n"
            "w.write_weights = slow\n"
            "import lighttransfer.convert.converter as c; c.write_weights = slow\n"
            "from lighttransfer.cli import main\n"
            f"main(['convert', {str(good_dir)!r}, '--layers', '1', '--out', {str(out)!r}, '-q'])\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "terminated" in err and "Traceback" not in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_stale_temp_directories_are_cleaned_or_reported(good_dir, tmp_path, caplog):
    from lighttransfer.convert import convert

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".out.tmp-{dead}-abc"
    old = tmp_path / ".out.tmp-xyz123"  # from before the name carried the pid
    for d in (stale, old):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 10)
    convert(str(good_dir), out=tmp_path / "out", layers=[1])
    assert not stale.exists() and old.exists()
    assert any(str(old) in r.getMessage() for r in caplog.records)


# ---- 5. rich markup in user strings -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["out/[v2]hyb", "bad[/x]path", "[bold]x[/bold]"], ids=["tag", "closing-tag", "style"])
def test_user_strings_are_printed_verbatim(name, good_dir, tmp_path, capsys):
    target = tmp_path / name
    code, out, err = run(["convert", str(good_dir), "--layers", "1", "--out", str(target), "--device", "cpu"], capsys)
    assert code == 0, err
    assert f"wrote {target}" in out.replace("\n", "")
    code, _, err = run(["inspect", str(tmp_path / name / "nothing")], capsys)
    _one_clean_line(code, err)
    assert str(tmp_path / name / "nothing") in err.replace("\n", "")


# ---- 6. smaller ones ------------------------------------------------------------------------------------------

def _tampered(good_dir: Path, tmp: Path, block) -> Path:
    d = tmp / "tampered"
    shutil.copytree(good_dir, d)
    config = json.loads((d / "config.json").read_text())
    config["lighttransfer"] = block
    (d / "config.json").write_text(json.dumps(config))
    return d


BLOCK = HybridConfig(num_layers=4, num_kv_heads=2, streaming_layers=[1], sink=2, window=16).to_dict()
SMALL = {
    "block-wrong-type": (lambda g, t, w: ["inspect", str(_tampered(g, t, {**BLOCK, "streaming_layers": ["x"]}))],
                         "config.json"),
    "block-wrong-shape": (lambda g, t, w: ["inspect", str(_tampered(g, t, {**BLOCK, "num_layers": 7}))],
                          "Reconvert"),
    "block-not-an-object": (lambda g, t, w: ["generate", str(_tampered(g, t, [1, 2])), "--prompt", "w5"],
                            "config.json"),
    "block-bool-window": (lambda g, t, w: ["generate", str(_tampered(g, t, {**BLOCK, "window": True})), "--prompt",
                                           "w5"], "reconvert"),
    "binary-calibration": (lambda g, t, w: ["analyze", str(g), "--calib", str(_binary(t)), "--seq-len", "64",
                                         "--window", "16"],
                           "binary"),
    "eval-stride-0": (lambda g, t, w: ["eval", "--baseline", str(g), "--text", str(w), "--stride", "0",
                                       "--out", str(t / "e.json")], "--stride"),
}


def _binary(tmp: Path) -> Path:
    path = tmp / "blob.txt"
    path.write_bytes(b"\x00\x01\x02text\x03\x04" * 100)
    return path


@pytest.mark.parametrize("case", list(SMALL))
def test_small_ones_are_one_line_with_the_fix(case, good_dir, words_file, tmp_path, capsys):
    make, fragment = SMALL[case]
    code, _, err = run([*make(good_dir, tmp_path, words_file), "--device", "cpu"] if case not in
                       ("block-wrong-type", "block-wrong-shape") else make(good_dir, tmp_path, words_file), capsys)
    _one_clean_line(code, err)
    assert fragment.lower() in err.lower(), err


@pytest.mark.parametrize("kwargs, fragment", [
    ({"layers": ["1"]}, "layers="), ({"layers": [True]}, "layers="), ({"layers": [1], "window": True}, "window"),
    ({"layers": [1], "ratio": "0.5"}, "ratio="), ({"layers": [1], "seed": 1.5}, "seed="),
    ({"samples": "8", "calib": None}, "samples="),
], ids=["layer-string", "layer-bool", "window-bool", "ratio-string", "seed-float", "samples-string"])
def test_api_arguments_of_the_wrong_type(kwargs, fragment, good_dir, tmp_path):
    from lighttransfer.convert import convert

    with pytest.raises(LightTransferError, match=fragment):
        convert(str(good_dir), out=tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["8", 8.0, True], ids=["string", "float", "bool"])
def test_analyze_api_arguments_of_the_wrong_type(value, good_dir):
    from lighttransfer.analysis import analyze

    with pytest.raises(LightTransferError, match="whole number"):
        analyze(str(good_dir), samples=value)


def test_convert_calib_takes_directories_and_several_files(good_dir, words_file, tmp_path, capsys):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(WORDS)
    (folder / "b.txt").write_text(WORDS)
    code, _, err = run(["convert", str(good_dir), "--calib", str(folder), str(words_file), "--seq-len", "64",
                        "--samples", "1", "--window", "16", "--sink", "2", "--out", str(tmp_path / "out"),
                        "--device", "cpu"], capsys)
    assert code == 0, err
    assert "analysing 1 x 64 tokens" in err  # and it said what it was doing


# ---- 7. transformers' conventions in the Python API -------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"dtype": torch.bfloat16}, {"dtype": "torch.float16"}, {"dtype": "bf16"},
    {"device": torch.device("cpu")}, {"device": torch.device("cpu"), "dtype": torch.float32},
    {"device_map": "cpu"}, {"device_map": torch.device("cpu")},
], ids=["torch-dtype", "torch-dtype-string", "alias", "torch-device", "both", "device-map", "device-map-torch"])
def test_api_takes_torch_dtypes_and_devices(kwargs, good_dir):
    import lighttransfer

    model = lighttransfer.load(str(good_dir), streaming_layers=[1], sink=2, window=16,
                               **{"device": "cpu", **kwargs})
    want = kwargs.get("dtype", torch.float32)
    want = {"torch.float16": torch.float16, "bf16": torch.bfloat16}.get(want, want)
    assert next(model.parameters()).dtype == want and next(model.parameters()).device.type == "cpu"


def test_api_refuses_other_dtypes_in_one_line(good_dir):
    import lighttransfer

    with pytest.raises(LightTransferError, match="dtype"):
        lighttransfer.load(str(good_dir), streaming_layers=[1], device="cpu", dtype=torch.int8)
