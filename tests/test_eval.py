"""Evaluation: perplexity scored beyond sink + window, passkey samples and answers, KV budgets, the masked
reference against the runtime, and the ``eval`` CLI on a tiny model directory with a byte-level tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model, run_cli
from lighttransfer.errors import LightTransferError
from lighttransfer.evaluation.backends import MaskedBackend, RuntimeBackend
from lighttransfer.evaluation.passkey import check_answer, make_sample, passkey_depths
from lighttransfer.evaluation.perplexity import perplexity, plan_windows
from lighttransfer.evaluation.rows import EvalRow, standard_rows
from lighttransfer.evaluation.scoring import continuation_logits, greedy_matches

SINK, WINDOW = 2, 16


def byte_tokenizer():
    """A byte-level BPE tokenizer with exactly 256 tokens and no merges (ids fit the tiny models' vocab)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def eval_inputs(tmp_path, long_text, monkeypatch, lazy_ratios=(0.9, 0.2, 0.8, 0.1), **report_attrs):
    """A tiny Llama with the byte tokenizer, 20k characters of text, and ``AnalysisReport.load`` answering with a
    stand-in report (per-layer lazy ratios, attention-scored heads, plus ``report_attrs``): ``(model_dir, text)``."""
    from lighttransfer.analysis import AnalysisReport

    model_dir = tmp_path / "model"
    make_tiny_model("llama").save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "text.txt"
    text.write_text(long_text[:20000])
    stub = type("StubReport", (), dict(head_score_method="attention", **report_attrs,
                                       layer_lazy_ratios=staticmethod(lambda: list(lazy_ratios))))
    monkeypatch.setattr(AnalysisReport, "load", classmethod(lambda cls, path: stub))
    return model_dir, text


@pytest.fixture(scope="module")
def tiny_dir_with_tokenizer(tmp_path_factory):
    from conftest import make_tiny_model

    d = tmp_path_factory.mktemp("tiny-eval")
    make_tiny_model("llama").save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, long_text):
    p = tmp_path_factory.mktemp("text") / "emma.txt"
    p.write_text(long_text[:20000])
    return p


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def _row(name="lt", layers=(0, 2), window=WINDOW, prefill="streaming", online=None, num_layers=4, kv=2):
    return EvalRow.of(name, num_layers=num_layers, num_kv_heads=kv, streaming_layers=list(layers), sink=SINK,
                   window=window, prefill=prefill, online_ratio=online)


# ---- perplexity ---------------------------------------------------------------------------------------------

def test_windows_score_only_beyond_sink_and_window():
    windows = plan_windows(1000, length=128, stride=32, min_context=SINK + WINDOW, max_windows=5)
    assert [w.start for w in windows] == [0, 32, 64, 96, 128]
    assert all(w.split == 96 and w.split >= SINK + WINDOW for w in windows)
    # consecutive windows score consecutive, non-overlapping spans of the text
    spans = [(w.start + w.split, w.start + w.length) for w in windows]
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))


@pytest.mark.parametrize("kwargs, match", [
    (dict(length=128, stride=120, min_context=18), "inside sink"),
    (dict(length=4096, stride=1024, min_context=18), "fewer than one window"),
    (dict(length=128, stride=0, min_context=18), "at least 1"),
], ids=["scored-inside-window", "text-too-short", "zero-stride"])
def test_window_plan_errors(kwargs, match):
    with pytest.raises(LightTransferError, match=match):
        plan_windows(1000, max_windows=2, **kwargs)


@pytest.mark.parametrize("prefill", ["streaming", "full"])
def test_hybrid_with_window_covering_everything_equals_dense(tiny_model, prefill):
    """Known answer: when the window holds the whole sequence, every streaming row is the dense model."""
    ids = _ids(600)
    windows = plan_windows(600, length=128, stride=32, min_context=SINK + WINDOW, max_windows=3)
    dense_row = EvalRow.of("original", num_layers=4, num_kv_heads=2)
    wide = _row(layers=range(4), window=128, prefill=prefill)
    for backend in (MaskedBackend(tiny_model), RuntimeBackend(tiny_model)):
        dense = perplexity(lambda b=backend: b.sequence(dense_row), ids, windows)
        hybrid = perplexity(lambda b=backend: b.sequence(wide), ids, windows)
        backend.release(wide)
        assert hybrid["tokens"] == dense["tokens"] == 3 * 32
        assert hybrid["nll"] == pytest.approx(dense["nll"], rel=1e-5, abs=1e-6)


def test_streaming_changes_only_positions_beyond_sink_and_window(tiny_model):
    ids = _ids(80).unsqueeze(0)
    dense = continuation_logits(tiny_model, ids, 1)
    with MaskedBackend(tiny_model).sequence(_row(layers=range(4))) as (model, after):
        hybrid = continuation_logits(model, ids, 1, after_prefill=after)
    # row t predicts token 1 + t from positions 0..t: identical while every key is visible (t < sink + window)
    inside = SINK + WINDOW - 1
    torch.testing.assert_close(hybrid[:, :inside], dense[:, :inside], rtol=1e-5, atol=1e-5)
    assert (hybrid[:, inside + 1 :] - dense[:, inside + 1 :]).abs().max() > 1e-3


@pytest.mark.parametrize("row", [
    _row(),
    _row(prefill="full"),
    _row(layers=(), online=0.5, prefill="full"),
], ids=["lazy-streaming-prefill", "full-prefill", "online"])
def test_masked_reference_matches_runtime(tiny_model, row):
    """Two independent implementations of the same hybrid give the same perplexity."""
    ids = _ids(700, seed=1)
    windows = plan_windows(700, length=160, stride=48, min_context=SINK + WINDOW, max_windows=2)
    masked = MaskedBackend(tiny_model)
    runtime = RuntimeBackend(tiny_model)
    a = perplexity(lambda: masked.sequence(row), ids, windows)
    b = perplexity(lambda: runtime.sequence(row), ids, windows)
    runtime.release(row)
    assert a["nll"] == pytest.approx(b["nll"], rel=1e-5)
    dense = perplexity(lambda: masked.sequence(EvalRow.of("original", num_layers=4, num_kv_heads=2)), ids, windows)
    assert a["nll"] != pytest.approx(dense["nll"], rel=1e-7)


# ---- passkey ------------------------------------------------------------------------------------------------

def test_passkey_sample_is_exact_length_with_the_key_at_its_depth(long_text):
    tok = byte_tokenizer()
    for depth in (0.0, 0.5, 1.0):
        s = make_sample(tok, long_text[:5000], length=400, depth=depth, seed=3)
        assert s.length == 400
        text = tok.decode(s.prompt_ids)
        assert text.count(s.key) >= 2 and text.rstrip().endswith("The pass key is")
        assert tok.decode(s.answer_ids) == f" {s.key}"
        where = text.index(s.key) / len(text)
        assert abs(where - depth) < 0.35


def test_passkey_depths():
    assert passkey_depths(10)[0] == 0.0 and passkey_depths(10)[-1] == 1.0 and len(passkey_depths(10)) == 10
    with pytest.raises(LightTransferError, match="at least 1"):
        passkey_depths(0)


def test_greedy_match_is_exact():
    logits = torch.full((2, 3, 10), -1.0)
    targets = torch.tensor([[1, 2, 3], [1, 2, 3]])
    logits[0, torch.arange(3), targets[0]] = 5.0
    logits[1, torch.arange(3), torch.tensor([1, 2, 4])] = 5.0
    assert greedy_matches(logits, targets).tolist() == [True, False]


class _Parrot(torch.nn.Module):
    """A stand-in model that always predicts ``answer[i]`` at the i-th position after the prompt."""

    def __init__(self, prompt_len: int, answer: torch.Tensor) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.prompt_len, self.answer = prompt_len, answer

    def forward(self, ids, past_key_values=None, use_cache=True, logits_to_keep=0):
        start = 0 if past_key_values is None else past_key_values
        pos = torch.arange(start, start + ids.shape[1])
        logits = torch.zeros(ids.shape[0], ids.shape[1], 300)
        for j, p in enumerate(pos.tolist()):
            k = p - (self.prompt_len - 1)
            if 0 <= k < len(self.answer):
                logits[:, j, self.answer[k]] = 1.0
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return type("Out", (), {"logits": logits, "past_key_values": start + ids.shape[1]})()


def test_check_answer_accepts_only_the_exact_key(long_text):
    tok = byte_tokenizer()
    s = make_sample(tok, long_text[:5000], length=300, depth=0.3, seed=1)
    assert check_answer(_Parrot(s.length, s.answer_ids), s)
    wrong = s.answer_ids.clone()
    wrong[-1] = (wrong[-1] + 1) % 256
    assert not check_answer(_Parrot(s.length, wrong), s)


# ---- rows and KV budgets ------------------------------------------------------------------------------------

def test_kv_fraction_counts_sink_and_window():
    row = _row()  # 2 of 4 layers stream, 2 KV heads, sink 2 + window 16
    assert row.kv_fraction(128) == pytest.approx((2 * 128 + 2 * 18) / (4 * 128))
    assert row.kv_fraction(10) == 1.0  # shorter than sink + window: nothing dropped
    assert EvalRow.of("original", num_layers=4, num_kv_heads=2).kv_fraction(4096) == 1.0
    assert _row(layers=(), online=0.5).kv_fraction(128) == row.kv_fraction(128)


def test_standard_rows_stream_equal_numbers_of_layers():
    lazy = [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4]
    rows = {r.name: r for r in standard_rows(lazy_ratios=lazy, ratio=0.5, num_kv_heads=2, sink=SINK, window=WINDOW)}
    assert rows["lighttransfer"].streaming_layers == [0, 2, 4, 6]
    assert rows["least-lazy"].streaming_layers == [1, 3, 5, 7]
    assert rows["prefill-full"].streaming_layers == [0, 2, 4, 6] and rows["prefill-full"].prefill == "full"
    assert rows["random"].streaming_layers != rows["lighttransfer"].streaming_layers
    assert rows["streamingllm"].streaming_layers == list(range(8))
    assert rows["online"].num_streaming_layers == 4 and rows["original"].is_dense
    assert {len(rows[n].streaming_layers) for n in ("lighttransfer", "random", "least-lazy")} == {4}
    with pytest.raises(LightTransferError, match="unknown row"):
        standard_rows(lazy_ratios=lazy, ratio=0.5, num_kv_heads=2, sink=2, window=16, names=["nope"])


# ---- CLI ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def report_file(tmp_path_factory):
    """A stand-in analysis report: only the per-layer lazy ratios (and the score method) are read."""
    from lighttransfer.analysis import AnalysisReport

    class _Stub:
        head_score_method = "attention"

        @staticmethod
        def layer_lazy_ratios():
            return [0.9, 0.2, 0.8, 0.1]

    return _Stub, AnalysisReport


def _stub_eval(model_dir, text_file, out, capsys, report_file, monkeypatch, *args: str) -> dict:
    """Run ``eval`` on the tiny model with the stand-in report and return its JSON."""
    stub, report_cls = report_file
    monkeypatch.setattr(report_cls, "load", classmethod(lambda cls, path: stub))
    code, _, err = run_cli(["eval", "--baseline", str(model_dir), "--text", str(text_file), "--report", "r.json",
                            "--windows", "1", "--passkey-trials", "1", "--sink", str(SINK), "--window", str(WINDOW),
                            "--device", "cpu", "--out", str(out), "-q", *args], capsys)
    assert code == 0, err
    return json.loads(out.read_text())


def test_eval_cli_writes_json_markdown_and_plots(tiny_dir_with_tokenizer, text_file, tmp_path, capsys,
                                                 report_file, monkeypatch):
    data = _stub_eval(tiny_dir_with_tokenizer, text_file, tmp_path / "res.json", capsys, report_file, monkeypatch,
                      "--lengths", "64,128", "--passkey-lengths", "256", "--passkey-depths", "3", "--ratio", "0.5")
    names = [r["name"] for r in data["rows"]]
    assert names == ["original", "lighttransfer", "random", "least-lazy", "streamingllm", "prefill-full", "online"]
    lt = data["rows"][1]
    assert lt["streaming_layers"] == [0, 2]
    assert lt["kv_fraction"]["128"] == pytest.approx((2 * 128 + 2 * 18) / (4 * 128))
    assert set(lt["perplexity"]) == {"64", "128"} and lt["passkey"]["n"] == 3
    low, high = lt["passkey"]["ci95"]
    assert len(lt["passkey"]["outcomes"]) == 3 and low <= lt["passkey"]["accuracy"] <= high
    assert set(lt["passkey"]["grid"]["256"]) == {"0.000", "0.500", "1.000"}
    assert (tmp_path / "res.md").read_text().count("| original") == 1
    assert (tmp_path / "res_passkey.png").stat().st_size > 0 and (tmp_path / "res_perplexity.png").exists()
    assert not list(tmp_path.glob(".eval-*"))


def test_eval_compares_several_wordings_on_the_same_keys(tiny_dir_with_tokenizer, text_file, tmp_path, capsys,
                                                        report_file, monkeypatch):
    data = _stub_eval(tiny_dir_with_tokenizer, text_file, tmp_path / "words.json", capsys, report_file, monkeypatch,
                      "--lengths", "64", "--passkey-lengths", "256", "--passkey-depths", "2",
                      "--passkey-format", "needle,passkey", "--rows", "original,lighttransfer")
    assert data["passkey_format"] == "needle" and data["passkey_formats"] == ["needle", "passkey"]
    for row in data["rows"]:
        by_format = row["passkey_by_format"]
        assert set(by_format) == {"needle", "passkey"} and by_format["passkey"]["n"] == 2
        assert row["passkey"] == by_format["needle"]  # the first wording fills the main columns
    md = (tmp_path / "words.md").read_text()
    assert "| needle @256 | needle all (95% CI) | vs original, points (95% CI) | passkey all |" in md
    assert "the last columns: 'passkey'" in md
    original = data["rows"][0]["passkey"]
    assert "| original | 0 |" in md and "+0 (+0 to +0)" in md.split("| original")[1].split("\n")[0]
    assert len(original["outcomes"]) == original["n"] == 2


@pytest.mark.parametrize("args, match", [
    (["--text", "/no/such/file.txt"], "does not exist"),
    (["--lengths", "64,abc"], "comma-separated list"),
    (["--lengths", "16"], "inside sink"),
    (["--text-lines", "9:3"], "FIRST <= LAST"),
    (["--rows", "original,bogus"], "unknown row"),
    (["--passkey-format", "passkey,riddle"], "--passkey-format 'riddle'"),
], ids=["missing-text", "bad-lengths", "length-inside-window", "bad-line-range", "unknown-row", "unknown-format"])
def test_eval_cli_errors_are_one_line(tiny_dir_with_tokenizer, text_file, tmp_path, capsys, args, match,
                                      report_file, monkeypatch):
    stub, report_cls = report_file
    monkeypatch.setattr(report_cls, "load", classmethod(lambda cls, path: stub))
    base = ["eval", "--baseline", str(tiny_dir_with_tokenizer), "--text", str(text_file), "--report", "r.json",
            "--lengths", "64", "--passkey-lengths", "", "--sink", str(SINK), "--window", str(WINDOW),
            "--device", "cpu", "--out", str(tmp_path / "r.json")]
    code, _, err = run_cli(base + args, capsys)
    assert code != 0
    assert match in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2  # one message (rich may wrap a long line once)
    assert not (tmp_path / "r.json").exists()


def test_head_level_row_has_the_layer_level_kv_budget():
    from conftest import make_tiny_model

    tiny_model = make_tiny_model("llama")  # 2 KV heads per layer
    lazy = [0.9, 0.1, 0.8, 0.2]
    scores = [[0.1, 0.9], [0.2, 0.3], [0.05, 0.8], [0.7, 0.6]]
    rows = {r.name: r for r in standard_rows(lazy_ratios=lazy, ratio=0.5, num_kv_heads=2, sink=SINK, window=WINDOW,
                                             names=["lighttransfer", "head-level"], kv_head_scores=scores)}
    head = rows["head-level"]
    assert head.layout.streaming_kv_heads == 4
    assert head.streaming_layers == [1] and head.head_masks == {0: [True, False], 2: [True, False]}
    for length in (64, 128, 1000):
        assert head.kv_fraction(length) == pytest.approx(rows["lighttransfer"].kv_fraction(length))
    # the masked reference runs mixed layers: streaming heads differ from dense, full heads do not
    ids = _ids(120).unsqueeze(0)
    dense = continuation_logits(tiny_model, ids, 60)
    with MaskedBackend(tiny_model).sequence(head) as (model, after):
        mixed = continuation_logits(model, ids, 60, after_prefill=after)
    assert (mixed - dense).abs().max() > 1e-4


# ---- head-level rows: attention mass against optimized gates -------------------------------------------------

@pytest.fixture(scope="module")
def gated_report(tiny_dir_with_tokenizer, tmp_path_factory):
    """A real analysis report of the tiny llama (4 layers x 2 KV heads) without gates, and a copy carrying gates
    that are the complement of the attention-mass choice at ratio 0.5: gate 1 on every head the mass would
    stream, 0 on every head it keeps full."""
    from lighttransfer.analysis.head_gates import HeadGateResult, attach_head_gates
    from lighttransfer.analysis.pipeline import analyze_tokens
    from lighttransfer.convert import select_kv_heads
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir_with_tokenizer, dtype=torch.float32).eval()
    report = analyze_tokens(model, _ids(128).view(2, 64), sink=SINK, window=WINDOW, last=8,
                            model_id=str(tiny_dir_with_tokenizer))
    d = tmp_path_factory.mktemp("gated-report")
    plain = report.save(d / "plain.json")
    by_mass = select_kv_heads(report.kv_head_long_context_scores("attention"), ratio=0.5)
    gates = [[1.0 if by_mass.get(layer, [False] * 2)[h] else 0.0 for h in range(2)] for layer in range(4)]
    attach_head_gates(report, HeadGateResult(gates=gates, loss_history=[0.0], distill_history=[0.0],
                                             gate_mean_history=[0.5], params={"steps": 1}))
    return plain, report.save(d / "gated.json"), by_mass


def test_head_level_gates_row_streams_the_lowest_gates():
    lazy = [0.9, 0.1, 0.8, 0.2]
    mass = [[0.1, 0.9], [0.2, 0.3], [0.05, 0.8], [0.7, 0.6]]
    gates = [[0.0, 1.0], [0.0, 0.0], [1.0, 0.9], [0.3, 0.1]]
    rows = {r.name: r for r in standard_rows(
        lazy_ratios=lazy, ratio=0.5, num_kv_heads=2, sink=SINK, window=WINDOW,
        names=["lighttransfer", "head-level", "head-level-gates"], kv_head_scores=mass, kv_head_gates=gates)}
    gated = rows["head-level-gates"]
    # the four lowest gates: layer 1 entirely, (0, 0) and (3, 1)
    assert gated.streaming_layers == [1] and gated.head_masks == {0: [True, False], 3: [False, True]}
    assert rows["head-level"].head_masks == {0: [True, False], 2: [True, False]}  # mass, not the gates
    assert "optimized gates" in gated.note
    for length in (64, 1000):
        assert gated.kv_fraction(length) == pytest.approx(rows["lighttransfer"].kv_fraction(length))
    with pytest.raises(LightTransferError, match="head-level-gates row needs KV-head gates"):
        standard_rows(lazy_ratios=lazy, ratio=0.5, num_kv_heads=2, sink=SINK, window=WINDOW,
                      names=["head-level-gates"], kv_head_scores=mass)


def test_head_level_baselines_stream_the_other_end_and_a_random_draw_of_the_same_size():
    gates = [[0.0, 1.0], [0.0, 0.0], [1.0, 0.9], [0.3, 0.1]]
    picked = {}
    for seed in (0, 1):
        rows = {r.name: r for r in standard_rows(
            lazy_ratios=[0.9, 0.1, 0.8, 0.2], ratio=0.5, num_kv_heads=2, sink=SINK, window=WINDOW,
            names=["lighttransfer", "random-heads", "least-lazy-heads"], kv_head_default=gates, seed=seed)}

        def cells(row):
            return {(layer, h) for layer in row.streaming_layers for h in range(2)} | {
                (layer, h) for layer, m in row.head_masks.items() for h, s in enumerate(m) if s}

        # the four highest gates: layer 2 entirely, (0, 1) and (3, 0)
        assert cells(rows["least-lazy-heads"]) == {(2, 0), (2, 1), (0, 1), (3, 0)}
        picked[seed] = cells(rows["random-heads"])
        assert len(picked[seed]) == 4 and f"seed {seed}" in rows["random-heads"].note
        assert rows["random-heads"].kv_fraction(500) == pytest.approx(rows["lighttransfer"].kv_fraction(500))
    assert picked[0] != picked[1]
    alone = standard_rows(lazy_ratios=[0.9, 0.1, 0.8, 0.2], ratio=0.5, num_kv_heads=2, sink=SINK, window=WINDOW,
                          names=["random-heads"])[0]  # no report: the draw needs only the shape
    assert sum(map(sum, alone.head_masks.values())) + 2 * len(alone.streaming_layers) == 4


def test_eval_cli_compares_mass_and_gate_picked_heads(tiny_dir_with_tokenizer, text_file, gated_report, tmp_path,
                                                      capsys):
    _, gated, by_mass = gated_report
    out = tmp_path / "heads.json"
    code, _, err = run_cli([
        "eval", "--baseline", str(tiny_dir_with_tokenizer), "--text", str(text_file), "--report", str(gated),
        "--lengths", "64", "--windows", "1", "--passkey-lengths", "", "--sink", str(SINK), "--window", str(WINDOW),
        "--ratio", "0.5", "--rows", "lighttransfer,lazy-ratio,least-lazy,head-level,head-level-gates",
        "--device", "cpu", "--out", str(out), "-q",
    ], capsys)
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    from lighttransfer.analysis.report import AnalysisReport
    from lighttransfer.convert.plan import pick_layers

    report = AnalysisReport.load(gated)
    by_gates = report.layer_streaming_scores("optimize")
    # like convert, the conversion row ranks layers by the gates; the lazy-ratio row keeps the attention rule
    assert rows["lighttransfer"]["streaming_layers"] == pick_layers(by_gates, ratio=0.5)
    assert rows["least-lazy"]["streaming_layers"] == pick_layers(by_gates, ratio=0.5, strategy="least_lazy")
    assert rows["lazy-ratio"]["streaming_layers"] == pick_layers(report.layer_lazy_ratios(), ratio=0.5)
    assert "gates" in rows["lighttransfer"]["note"] and rows["lazy-ratio"]["kv_fraction"] == rows["lighttransfer"]["kv_fraction"]

    def streaming(row) -> set[tuple[int, int]]:
        cells = {(layer, h) for layer in row["streaming_layers"] for h in range(2)}
        return cells | {(int(layer), h) for layer, m in row["head_masks"].items() for h, s in enumerate(m) if s}

    mass_cells = {(layer, h) for layer, m in by_mass.items() for h, s in enumerate(m) if s}
    # head-level keeps ranking by attention mass although the report's default score is now the gates
    assert streaming(rows["head-level"]) == mass_cells and len(mass_cells) == 4
    # the gates were set to the complement of that choice, so the gate row streams exactly the other heads
    assert streaming(rows["head-level-gates"]) == {(layer, h) for layer in range(4) for h in range(2)} - mass_cells
    assert rows["head-level-gates"]["kv_fraction"] == rows["lighttransfer"]["kv_fraction"]
    assert rows["head-level-gates"]["perplexity"]["64"]["ppl"] != rows["head-level"]["perplexity"]["64"]["ppl"]


def test_eval_cli_head_level_gates_without_gates_is_one_line(tiny_dir_with_tokenizer, text_file, gated_report,
                                                             tmp_path, capsys):
    plain, _, _ = gated_report
    out = tmp_path / "r.json"
    code, _, err = run_cli([
        "eval", "--baseline", str(tiny_dir_with_tokenizer), "--text", str(text_file), "--report", str(plain),
        "--lengths", "64", "--passkey-lengths", "", "--sink", str(SINK), "--window", str(WINDOW),
        "--rows", "original,head-level-gates", "--device", "cpu", "--out", str(out),
    ], capsys)
    assert code != 0 and "Traceback" not in err
    assert "head-level-gates" in err and "has none" in err and "--method optimize" in err
    assert len(err.strip().splitlines()) <= 2  # one message (rich may wrap a long line once)
    assert not out.exists()


def test_the_needle_format_words_the_prompt_differently_at_the_same_length():
    from lighttransfer.calibration.passkey import HELD_OUT_TEMPLATES, TEMPLATES, TRAINING_TEMPLATES

    tokenizer = byte_tokenizer()
    filler = "It was a truth universally acknowledged. " * 40
    a = make_sample(tokenizer, filler, length=400, depth=0.5, seed=3)
    b = make_sample(tokenizer, filler, length=400, depth=0.5, seed=3, template="needle")
    assert a.length == b.length == 400 and a.key == b.key
    text = tokenizer.decode(b.prompt_ids)
    assert "blue door is " + b.key in text and "pass key" not in text
    assert "pass key is " + a.key in tokenizer.decode(a.prompt_ids)
    # every wording is either trained on or held out, never both
    assert set(TRAINING_TEMPLATES) | set(HELD_OUT_TEMPLATES) == set(TEMPLATES)
    assert not set(TRAINING_TEMPLATES) & set(HELD_OUT_TEMPLATES) and "needle" in HELD_OUT_TEMPLATES
    with pytest.raises(LightTransferError, match="passkey format 'other'"):
        make_sample(tokenizer, filler, length=400, depth=0.5, seed=3, template="other")


@pytest.mark.parametrize("template", ["passkey", "vault", "ticket", "phone", "password", "record", "needle",
                                      "locker"])
def test_every_wording_hides_its_key_and_ends_with_its_question(template):
    from lighttransfer.calibration.passkey import TEMPLATES

    tokenizer = byte_tokenizer()
    filler = "It was a truth universally acknowledged. " * 40
    sample = make_sample(tokenizer, filler, length=420, depth=0.3, seed=5, template=template)
    text = tokenizer.decode(sample.prompt_ids)
    words = TEMPLATES[template]
    assert sample.length == 420 and len(sample.prompt_ids) == 420
    assert words.needle.format(key=sample.key).strip() in text
    assert text.endswith(words.question) and text.count(sample.key) >= 2


def test_eval_off_a_terminal_logs_plain_progress_lines(tiny_dir_with_tokenizer, text_file, tmp_path, capsys,
                                                       report_file, monkeypatch):
    stub, report_cls = report_file
    monkeypatch.setattr(report_cls, "load", classmethod(lambda cls, path: stub))
    code, _, err = run_cli([
        "eval", "--baseline", str(tiny_dir_with_tokenizer), "--text", str(text_file), "--report", "r.json",
        "--lengths", "64", "--windows", "1", "--passkey-lengths", "", "--sink", str(SINK), "--window",
        str(WINDOW), "--rows", "original,lighttransfer", "--device", "cpu", "--out", str(tmp_path / "r.json"),
    ], capsys)
    assert code == 0, err
    assert "eval: 2/2 (" in err  # the last step is always logged, with its description


def test_eval_runs_the_ruler_suite_on_every_row(tiny_dir_with_tokenizer, text_file, tmp_path, capsys, report_file,
                                                monkeypatch):
    """``--suite ruler``: one task of each family (every task is generated and scored in test_ruler.py), the same
    samples for every row, scores, the paired column and the heatmap."""
    TASKS = ("niah_single_1", "vt", "fwe")
    data = _stub_eval(tiny_dir_with_tokenizer, text_file, tmp_path / "ruler.json", capsys, report_file, monkeypatch,
                      "--suite", "ruler", "--ruler-tasks", ",".join(TASKS), "--lengths", "700", "--samples", "1",
                      "--rows", "original,lighttransfer")
    assert data["suite"] == ["ruler"] and data["ruler_lengths"] == [700] and data["lengths"] == []
    assert data["ruler_tasks"] == list(TASKS) and data["ruler_samples"] == 1
    original, hybrid = (row["ruler"] for row in data["rows"])
    assert set(original["by_task"]) == set(TASKS) and len(original["outcomes"]) == len(TASKS)
    assert [s["answers"] for s in original["samples"]] == [s["answers"] for s in hybrid["samples"]]
    assert all(0 <= x <= 100 for x in original["outcomes"] + hybrid["outcomes"])
    assert "perplexity" not in data["rows"][0] or data["rows"][0]["perplexity"] == {}
    md = (tmp_path / "ruler.md").read_text()
    assert "RULER-style tasks" in md and "| lighttransfer |" in md and "vs original, points (95% CI)" in md
    assert (tmp_path / "ruler_ruler.png").stat().st_size > 0 and not (tmp_path / "ruler_perplexity.png").exists()


def test_eval_ruler_batches_on_the_runtime_give_the_one_by_one_scores(tiny_dir_with_tokenizer, text_file, tmp_path,
                                                                      capsys, report_file, monkeypatch):
    args = ("--suite", "ruler", "--ruler-tasks", "niah_single_1,vt", "--lengths", "700", "--samples", "3",
            "--rows", "original,lighttransfer", "--backend", "runtime")
    alone = _stub_eval(tiny_dir_with_tokenizer, text_file, tmp_path / "a.json", capsys, report_file, monkeypatch,
                       *args)
    together = _stub_eval(tiny_dir_with_tokenizer, text_file, tmp_path / "b.json", capsys, report_file,
                          monkeypatch, *args, "--ruler-batch", "3")
    assert alone["ruler_batch"] == 1 and together["ruler_batch"] == 3
    for a, b in zip(alone["rows"], together["rows"], strict=True):
        assert a["ruler"]["samples"] == b["ruler"]["samples"]


def test_rows_run_apart_merge_into_the_one_run(tiny_dir_with_tokenizer, text_file, tmp_path, capsys, report_file,
                                               monkeypatch):
    args = ("--suite", "perplexity,ruler", "--ruler-tasks", "niah_single_1", "--lengths", "700", "--samples", "2")
    both = _stub_eval(tiny_dir_with_tokenizer, text_file, tmp_path / "both.json", capsys, report_file, monkeypatch,
                      *args, "--rows", "original,lighttransfer")
    for row in ("original", "lighttransfer"):
        _stub_eval(tiny_dir_with_tokenizer, text_file, tmp_path / f"{row}.json", capsys, report_file, monkeypatch,
                   *args, "--rows", row)
    _stub_eval(tiny_dir_with_tokenizer, text_file, tmp_path / "other.json", capsys, report_file, monkeypatch,
               *args[:-1], "3", "--rows", "random")
    code, _, err = run_cli(["eval-merge", str(tmp_path / "original.json"), str(tmp_path / "lighttransfer.json"),
                            "--out", str(tmp_path / "merged.json")], capsys)
    assert code == 0, err
    merged = json.loads((tmp_path / "merged.json").read_text())
    drop = lambda row: {k: v for k, v in row.items() if k != "seconds"}  # noqa: E731
    assert [drop(r) for r in merged["rows"]] == [drop(r) for r in both["rows"]]
    assert [p["rows"] for p in merged["environment"]["parts"]] == [["original"], ["lighttransfer"]]
    md = (tmp_path / "merged.md").read_text()
    assert "vs original" in md and (tmp_path / "merged_ruler.png").exists()
    # parts of different evaluations, or one row twice: one line, nothing written
    for extra, message in ((str(tmp_path / "other.json"), "differs from"), (str(tmp_path / "original.json"),
                                                                             "is in both")):
        code, _, err = run_cli(["eval-merge", str(tmp_path / "original.json"), extra, "--out",
                                str(tmp_path / "bad.json")], capsys)
        assert code != 0 and message in err and "Traceback" not in err
        assert not (tmp_path / "bad.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--suite", "perplexity,rulers"], "--suite"),
    (["--suite", "ruler", "--ruler-tasks", "niah_single_9"], "unknown RULER task"),
    (["--suite", "ruler", "--samples", "0"], "--samples"),
    (["--suite", "ruler", "--ruler-batch", "0", "--backend", "runtime"], "--ruler-batch"),
    (["--suite", "ruler", "--ruler-batch", "4"], "needs --backend runtime"),
], ids=["suite", "task", "samples", "batch", "batch-masked"])
def test_eval_ruler_options_are_checked_before_any_work(tiny_dir_with_tokenizer, text_file, tmp_path, capsys,
                                                        args, message):
    code, _, err = run_cli(["eval", "--baseline", str(tiny_dir_with_tokenizer), "--text", str(text_file),
                            "--device", "cpu", "--out", str(tmp_path / "x.json"), *args], capsys)
    assert code != 0 and message in err and "Traceback" not in err
    assert not (tmp_path / "x.json").exists()


def test_a_run_cut_short_keeps_its_finished_rows(tiny_dir_with_tokenizer, text_file, tmp_path, capsys, report_file,
                                                 monkeypatch):
    """Rows are kept in NAME.partial.json as they finish (eval-merge reads it); a finished run removes it."""
    args = ("--suite", "perplexity", "--lengths", "64", "--rows", "original,lighttransfer")
    done = _stub_eval(tiny_dir_with_tokenizer, text_file, tmp_path / "done.json", capsys, report_file, monkeypatch,
                      *args)
    assert not (tmp_path / "done.partial.json").exists()

    import lighttransfer.evaluation.eval_suite as suite

    real = suite.perplexity
    calls = []

    def dies_in_the_second_row(*a, **kw):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt  # the machine's time ran out
        return real(*a, **kw)

    monkeypatch.setattr(suite, "perplexity", dies_in_the_second_row)
    stub, report_cls = report_file
    monkeypatch.setattr(report_cls, "load", classmethod(lambda cls, path: stub))
    code, _, err = run_cli(["eval", "--baseline", str(tiny_dir_with_tokenizer), "--text", str(text_file),
                            "--report", "r.json", "--windows", "1", "--sink", str(SINK), "--window", str(WINDOW),
                            "--device", "cpu", "--out", str(tmp_path / "cut.json"), "-q", *args], capsys)
    assert code == 130 and "the finished rows are in" in err and "cut.partial.json" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "cut.json").exists()
    kept = json.loads((tmp_path / "cut.partial.json").read_text())
    assert [r["name"] for r in kept["rows"]] == ["original"]
    assert kept["rows"][0]["perplexity"] == done["rows"][0]["perplexity"]
    code, _, err = run_cli(["eval-merge", str(tmp_path / "cut.partial.json"), "--out", str(tmp_path / "m.json")],
                           capsys)
    assert code == 0, err
