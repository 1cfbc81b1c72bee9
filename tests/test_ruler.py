"""The RULER-style suite: prompt fitting, answers present in the context, scoring, greedy generation."""

from __future__ import annotations

import contextlib
import re
import zlib
from collections import Counter

import pytest
import torch
from lighttransfer.errors import LightTransferError
from lighttransfer.evaluation.ruler import (
    DEFAULT_TASKS,
    TASKS,
    build_samples,
    check_tasks,
    greedy_generate,
    greedy_generate_batch,
    heatmap,
    markdown_table,
    run_samples,
    score,
    string_match_all,
    string_match_part,
)
from lighttransfer.evaluation.ruler.haystack import NOISE, essay_haystack, insert_at_depths, split_sentences
from lighttransfer.evaluation.ruler.words import shipped_vocabulary

try:
    from conftest import SHARED_ASSETS
except ImportError:  # pytest --import-mode=importlib: the same path conftest.py defines
    from pathlib import Path

    SHARED_ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"

TOKENIZER_JSON = SHARED_ASSETS / "smollm2-135m-instruct" / "tokenizer.json"
LENGTHS = (512, 1024)


class WordTokenizer:
    """A deterministic stand-in tokenizer: a word or punctuation mark with its leading spaces is one token.

    Ids are CRC32 hashes modulo ``vocab_size`` (id 0 is reserved as EOS); ``decode`` maps an id back to the
    first piece seen with it.
    """

    _PIECE = re.compile(r"\s*(?:\w+|[^\w\s])")

    def __init__(self, vocab_size: int = 256) -> None:
        self.vocab_size = vocab_size
        self.eos_token_id = 0
        self._pieces: dict[int, str] = {}

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self._PIECE.findall(text):
            i = 1 + zlib.crc32(piece.encode()) % (self.vocab_size - 1)
            self._pieces.setdefault(i, piece)
            ids.append(i)
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(self._pieces.get(int(i), "") for i in ids if int(i) != 0 or not skip_special_tokens)


def _real_tokenizer():
    if not TOKENIZER_JSON.is_file():
        pytest.skip(f"needs the shared SmolLM2 tokenizer at {TOKENIZER_JSON}")
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_JSON))


@pytest.fixture(scope="module", params=["smollm2", "stub"])
def tokenizer(request):
    return _real_tokenizer() if request.param == "smollm2" else WordTokenizer()


@pytest.fixture(scope="module")
def samples(tokenizer):
    return build_samples(tokenizer, lengths=LENGTHS, samples_per_task=2, seed=0)


# ---------------------------------------------------------------------------------------------- lengths


def test_every_task_fits_its_length(samples, tokenizer):
    assert {s.task for s in samples} == set(DEFAULT_TASKS)
    assert len(samples) == len(DEFAULT_TASKS) * len(LENGTHS) * 2
    for s in samples:
        n = len(s.input_ids)
        assert n == len(tokenizer.encode(s.prompt))
        assert 0.9 * s.length <= n <= s.length, (s.task, s.length, n)
        assert s.metric == ("part" if s.task == "qa_haystack" else "all")
        assert s.answers and all(isinstance(a, str) and a for a in s.answers)


def test_budgets_follow_ruler():
    budgets = {name: task.max_new_tokens for name, task in TASKS.items()}
    assert {b for n, b in budgets.items() if n.startswith("niah")} == {128}
    assert (budgets["vt"], budgets["cwe"], budgets["fwe"], budgets["qa_haystack"]) == (30, 120, 50, 32)


def test_same_seed_same_samples_other_seed_differs(samples, tokenizer):
    again = build_samples(tokenizer, lengths=LENGTHS, samples_per_task=2, seed=0)
    assert [s.to_dict() for s in again] == [s.to_dict() for s in samples]
    other = build_samples(tokenizer, lengths=LENGTHS[:1], samples_per_task=1, seed=1)
    first = {(s.task, s.length): s for s in samples if s.index == 0}
    for s in other:
        assert s.prompt != first[(s.task, s.length)].prompt, s.task
        assert s.answers != first[(s.task, s.length)].answers, s.task


def test_adding_tasks_leaves_other_tasks_alone(tokenizer):
    alone = build_samples(tokenizer, lengths=[512], samples_per_task=2, tasks="vt", seed=3)
    mixed = build_samples(tokenizer, lengths=[512], samples_per_task=2, tasks="cwe,vt", seed=3)
    assert [s.to_dict() for s in alone] == [s.to_dict() for s in mixed if s.task == "vt"]


def test_samples_within_a_cell_differ(samples):
    for task in DEFAULT_TASKS:
        a, b = [s for s in samples if s.task == task and s.length == 512]
        assert a.prompt != b.prompt and a.seed != b.seed


# ---------------------------------------------------------------------------------------------- contents


def _context(s) -> str:
    """The prompt between the intro and the question."""
    body = s.prompt.split("\n\n", 1)[1]
    return body.rsplit("\n\n", 1)[0]


_NIAH_QUERY = re.compile(r"magic (?:numbers|UUIDs) for (.+?) given in the text above\?")


def test_niah_values_are_in_needles_of_the_queried_keys(samples):
    for s in (s for s in samples if s.task.startswith("niah")):
        context = _context(s)
        keys = re.split(r", | and ", _NIAH_QUERY.search(s.prompt).group(1))
        needles = re.findall(r"A special magic (?:number|UUID) for (\S+) is: (\S+)\.", context)
        real = [v for k, v in needles if k in keys]
        assert sorted(real) == sorted(s.answers), s.task
        assert len(set(keys)) == len(keys)
        expect = {"niah_multiquery": 4, "niah_multivalue": 4}.get(s.task, 1)
        assert len(s.answers) == expect and len(keys) == (4 if s.task == "niah_multiquery" else 1)
        others = [k for k, _ in needles if k not in keys]
        if s.task == "niah_multikey_1":
            assert len(others) == 3
        elif s.task in ("niah_multikey_2", "niah_multikey_3"):
            assert len(others) >= 2 and len(set(others)) == len(others)
        elif s.task != "niah_multiquery":
            assert not others
        if s.task == "niah_multikey_3":
            assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", k)
                       for k in keys + s.answers)
        if s.task == "niah_single_1":
            assert "The grass is green." in context and "special magic number for" in context
        assert 0 <= s.depth <= 100


def test_vt_answer_is_the_chain_of_the_asked_value(samples):
    for s in (s for s in samples if s.task == "vt"):
        context = _context(s)
        value = re.search(r"assigned the value (\d+) in the text above", s.prompt).group(1)
        first, second = s.answers
        a = context.index(f"VAR {first} = {value}.")
        b = context.index(f"VAR {second} = VAR {first}.")
        assert a < b
        assert len(re.findall(r"VAR [A-Z]{5} =", context)) == 2
        assert "The sky is blue." in context


def test_cwe_answers_are_the_most_common_list_words(samples):
    for s in (s for s in samples if s.task == "cwe"):
        counts = Counter(re.findall(r"^\d+\. (\w+)$", _context(s), flags=re.M))
        assert set(s.answers) == {w for w, _ in counts.most_common(10)}
        assert min(counts[w] for w in s.answers) > max(c for w, c in counts.items() if w not in s.answers)
        assert len(counts) > 10


def test_fwe_answers_are_the_three_most_frequent_words(samples):
    for s in (s for s in samples if s.task == "fwe"):
        counts = Counter(_context(s).split())
        top = counts.most_common(4)
        assert [w for w, _ in top[:3]] == s.answers
        assert top[0][1] > top[1][1] > top[2][1] > top[3][1]


def test_qa_sentence_with_the_name_is_in_the_context(samples):
    from lighttransfer.calibration import SHIPPED_TEXT

    vocab_names = set(shipped_vocabulary())
    text = SHIPPED_TEXT.read_text()
    frequent = {w for w, _ in Counter(re.findall(r"\b[A-Z][a-z]{2,}\b", text)).most_common(10)}
    for s in (s for s in samples if s.task == "qa_haystack"):
        prefix = re.search(r'begins with "(.+?)"\. Which name', s.prompt).group(1)
        context = _context(s)
        assert context.count(prefix) >= 1
        following = context[context.index(prefix):].split()[:45]
        assert any(name in w for name in s.answers for w in following)
        assert not any(name in prefix for name in s.answers)
        assert all(name[0].isupper() and name.lower() not in vocab_names for name in s.answers)
        assert not frequent & set(s.answers)


# ---------------------------------------------------------------------------------------------- haystack


def test_haystack_cuts_at_words_and_inserts_at_depths():
    hay = essay_haystack("Alpha beta gamma. Delta epsilon! Mr. Zeta eta? Theta")
    assert split_sentences(hay.text) == ["Alpha beta gamma.", "Delta epsilon!", "Mr. Zeta eta?", "Theta"]
    assert hay.take(4) == ["Alpha beta gamma.", "Delta"]
    assert hay.take(12)[-1] == "Alpha beta gamma."  # repeats from the start
    assert insert_at_depths(["a.", "b."], [(0.0, "X"), (1.0, "Y")]) == "X a. b. Y"
    assert essay_haystack(NOISE).sentence_starts == (0, 4, 8, 12, 15)


# ---------------------------------------------------------------------------------------------- errors


def test_too_short_length_names_task_and_length(tokenizer):
    for task in ("niah_single_1", "cwe", "fwe"):
        with pytest.raises(LightTransferError, match=rf"{task}.*\b40 tokens"):
            build_samples(tokenizer, lengths=[40], samples_per_task=1, tasks=task)


def test_check_tasks():
    assert check_tasks("niah_single_1, vt,vt") == ["niah_single_1", "vt"]
    with pytest.raises(LightTransferError, match="bogus.*known tasks: niah_single_1") as info:
        check_tasks("niah_single_1,bogus")
    assert "\n" not in str(info.value)


def test_caller_essay_and_qa_without_names():
    tok = WordTokenizer()
    essay = "the cat sat on the mat and looked at the quiet garden for a while. " * 40
    (s,) = build_samples(tok, lengths=[512], samples_per_task=1, tasks="niah_single_2", essay_text=essay)
    assert "the cat sat on the mat" in s.prompt
    with pytest.raises(LightTransferError, match="qa_haystack"):
        build_samples(tok, lengths=[512], samples_per_task=1, tasks="qa_haystack", essay_text=essay)


# ---------------------------------------------------------------------------------------------- scoring


def test_metrics_on_hand_cases():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert string_match_part("The numbers are 123 and 456.", ["123", "456", "789"]) == 1.0
    assert string_match_part("nothing here", ["123", "456"]) == 0.0
    assert string_match_all("ELINOR and Marianne", ["elinor", "MARIANNE"]) == 1.0
    assert score("Elinor", ["Elinor", "Brandon"], "part") == 100.0
    assert score("Elinor", ["Elinor", "Brandon"], "all") == 50.0
    with pytest.raises(ValueError):
        score("x", ["x"], "exact")


def test_perfect_answers_score_100_wrong_ones_0(samples):
    for s in samples:
        assert score(" " + ", ".join(s.answers) + ".", s.answers, s.metric) == 100.0, s.task
        assert score(" zzzz qqqq", s.answers, s.metric) == 0.0, s.task


# ---------------------------------------------------------------------------------------------- generation


def _tiny_llama(vocab_size: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=2048, vocab_size=vocab_size)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


class _Sequences:
    """A ``sequence`` callable that hands out one model and counts what the suite does with it."""

    def __init__(self, model) -> None:
        self.model, self.entered, self.after = model, 0, []
        self.forwards = 0
        model.register_forward_hook(lambda *_: setattr(self, "forwards", self.forwards + 1))

    def _after_prefill(self) -> None:
        self.after.append(self.forwards)

    @contextlib.contextmanager
    def __call__(self):
        self.entered += 1
        self.forwards = 0
        yield self.model, self._after_prefill


@pytest.fixture(scope="module")
def generation(tokenizer):
    model = _tiny_llama(len(tokenizer))
    samples = build_samples(tokenizer, lengths=[512], samples_per_task=1,
                            tasks="niah_single_1,vt,fwe,qa_haystack", seed=0)
    return model, samples


def test_run_samples_generates_within_budget_and_scores(generation, tokenizer):
    model, samples = generation
    seq = _Sequences(model)
    seen = []
    result = run_samples(seq, samples, tokenizer=tokenizer, eos_token_id=-1,
                         on_sample=lambda: seen.append(seq.entered))
    assert seq.entered == len(samples) and seq.after == [1] * len(samples)  # once each, right after prefill
    assert seen == list(range(1, len(samples) + 1))
    assert result["outcomes"] == [o["score"] for o in result["samples"]]
    assert [(o["task"], o["index"]) for o in result["samples"]] == [(s.task, s.index) for s in samples]
    for o, s in zip(result["samples"], samples, strict=True):
        assert o["new_tokens"] == s.max_new_tokens  # no EOS can occur
        assert 0.0 <= o["score"] <= 100.0
    assert set(result["by_task"]) == {s.task for s in samples}
    assert result["by_task_length"]["vt"] == {"512": result["by_task"]["vt"]}
    assert result["average"] == pytest.approx(sum(result["by_task"].values()) / len(result["by_task"]))
    assert list(result) == sorted(result) and result["schema_version"] == 1
    again = run_samples(_Sequences(model), samples, tokenizer=tokenizer, eos_token_id=-1)
    assert again == result


def test_run_samples_stops_at_eos(generation, tokenizer):
    model, samples = generation
    with torch.inference_mode():
        first = greedy_generate(model, samples[0].input_ids, 1, set())[0]
    result = run_samples(_Sequences(model), samples[:1], tokenizer=tokenizer, eos_token_id=first)
    assert result["samples"][0]["new_tokens"] == 1


def test_greedy_loop_matches_generate(generation):
    model, samples = generation
    s = samples[0]
    ids = torch.tensor([s.input_ids])
    with torch.inference_mode():
        ours = greedy_generate(model, s.input_ids, 24, set())
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    assert ours == ref[0, ids.shape[1]:].tolist()


def _prompts_of_three_lengths(samples):
    """Three prompts of clearly different lengths (so the batch pads), cut from one sample's prompt."""
    ids = samples[0].input_ids
    return [ids, ids[: len(ids) - 37], ids[5: len(ids) - 90]]


@pytest.mark.parametrize("hybrid", [False, True], ids=["dense", "hybrid-runtime"])
def test_left_padded_batch_generates_what_each_prompt_would_alone(generation, hybrid):
    from lighttransfer.hybrid_format import HybridLayout
    from lighttransfer.runtime import disable_hybrid, enable_hybrid

    model, samples = generation
    prompts = _prompts_of_three_lengths(samples)
    if hybrid:  # layer 1 streams with a window the prompts outgrow: the sink must follow each row's padding
        enable_hybrid(model, HybridLayout(num_layers=2, num_kv_heads=2, streaming_layers=(1,), sink=4, window=64))
    try:
        with torch.inference_mode():
            alone = [greedy_generate(model, p, 12, set()) for p in prompts]
            together = greedy_generate_batch(model, prompts, 12, set(), pad_id=0)
    finally:
        disable_hybrid(model)
    assert together == alone


def test_batch_rows_stop_at_their_own_eos(generation):
    model, samples = generation
    prompts = _prompts_of_three_lengths(samples)
    with torch.inference_mode():
        alone = [greedy_generate(model, p, 10, set()) for p in prompts]
        stop = alone[1][3]  # the fourth token of the second row ends that row (and any row that makes it)
        together = greedy_generate_batch(model, prompts, 10, {stop}, pad_id=0)
    for got, full in zip(together, alone, strict=True):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert got == full[:cut]
    assert len(together[1]) <= 4


class _Plain(_Sequences):
    """Like :class:`_Sequences` but with no after-prefill step (what a batch needs)."""

    @contextlib.contextmanager
    def __call__(self):
        self.entered += 1
        yield self.model, None


def test_run_samples_in_batches_equals_one_by_one(tokenizer):
    model = _tiny_llama(len(tokenizer))
    samples = build_samples(tokenizer, lengths=[512, 600], samples_per_task=3, tasks="niah_single_1,vt", seed=1)
    alone = run_samples(_Plain(model), samples, tokenizer=tokenizer, eos_token_id=-1)
    seq = _Plain(model)
    together = run_samples(seq, samples, tokenizer=tokenizer, eos_token_id=-1, batch_size=2)
    assert seq.entered == 8  # per (task, length): a batch of 2, then 1
    assert together == alone


def test_batches_refuse_per_prompt_rows_and_bad_sizes(generation, tokenizer):
    model, samples = generation
    two = [samples[0], samples[0]]
    with pytest.raises(LightTransferError, match="batch size of 1"):
        run_samples(_Sequences(model), two, tokenizer=tokenizer, batch_size=2)
    with pytest.raises(LightTransferError, match="batch size must be a whole number"):
        run_samples(_Plain(model), two, tokenizer=tokenizer, batch_size=0)


# ---------------------------------------------------------------------------------------------- reports


def _fake_result(scores: dict[str, dict[str, float]]) -> dict:
    from lighttransfer.evaluation.ruler import RulerResult

    outcomes = [{"task": t, "length": int(n), "index": 0, "score": v} for t, cells in scores.items()
                for n, v in cells.items()]
    return RulerResult.from_outcomes(outcomes).to_dict()


def test_markdown_table_averages_over_lengths():
    dense = _fake_result({"vt": {"512": 100.0, "1024": 50.0}, "niah_single_1": {"512": 100.0}})
    lazy = _fake_result({"vt": {"512": 0.0, "1024": 0.0}})
    table = markdown_table({"dense": dense, "lazy": lazy})
    lines = table.strip().splitlines()
    assert lines[0] == "| row | niah_single_1 | vt | average |"
    assert lines[2] == "| dense | 100.0 | 75.0 | 87.5 |"
    assert lines[3] == "| lazy | - | 0.0 | 0.0 |"


def test_heatmap_writes_atomically(tmp_path):
    result = _fake_result({"vt": {"512": 100.0, "1024": 50.0}, "cwe": {"512": 20.0}})
    path = heatmap(result, tmp_path / "ruler.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["ruler.png"]
