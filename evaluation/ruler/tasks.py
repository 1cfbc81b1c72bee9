"""The RULER task families, one frozen dataclass each, with ``build(rng, haystack, tokenizer, length)``.

Every ``build`` draws all its random choices (keys, values, depths, offsets) from ``rng`` first, then fits
the haystack size to ``length`` tokens (:mod:`.fit`) and returns a :class:`~.sample.RulerSample`. The
``haystack`` argument is the caller's essay haystack (read from word 0); tasks on the noise haystack ignore
it. Prompts are plain text that ends in an answer prefix (RULER's base-model format), so a model continues
with the answer; the wording is ours, the structure RULER's.

Families (the defaults of :data:`.suite.TASKS` in brackets):

* :class:`NeedleTask` -- needle in a haystack, needles ``A special magic number for <key> is: <value>.``;
  haystack ``noise``/``essay`` or ``needle`` (distractor needles only); keys words or UUIDs; values 7-digit
  numbers or UUIDs; several keys (distractors), values per key, or queried keys [niah_*: 128 new tokens,
  metric all].
* :class:`VariableTracking` -- chains ``VAR ABCDE = 12345.`` then ``VAR FGHIJ = VAR ABCDE.`` ... hidden in
  noise; name every variable holding the first chain's value [vt: 1 chain, 1 hop, 30 tokens, all].
* :class:`CommonWords` -- a numbered list of vocabulary words, 10 common ones repeated ``freq_common`` times
  and the rest ``freq_uncommon`` times; name the 10 common ones [cwe: 120 tokens, all].
* :class:`FrequentWords` -- made-up words with Zipf-like counts (count of rank r proportional to
  ``r ** -alpha``); name the 3 most frequent [fwe: 50 tokens, all].
* :class:`PlantedSentenceQA` -- ours ("lighttransfer-qa"), not RULER's SQuAD/HotpotQA QA, which needs data
  we cannot ship: a sentence of the essay that contains a name (a capitalized word whose lowercase form
  never occurs in the text, titles such as "Mr" excluded) is planted at a random depth of the haystack, and
  the question quotes its first words (which hold no name and occur nowhere else in the essay) and asks
  which name the sentence contains [qa_haystack: 32 tokens, metric part over the sentence's names].
  Sentences whose names are all outside the essay's 10 most frequent names are preferred, so that naming
  the main character is not a good guess.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from ...errors import LightTransferError
from .fit import Fit, fit_prompt
from .haystack import Haystack, insert_at_depths, noise_haystack, normalize, split_sentences
from .sample import RulerSample
from .words import (
    coded_word,
    distinct,
    random_key,
    random_number,
    random_uuid,
    shipped_vocabulary,
    variable_name,
)


class _Pool:
    """An endless, deterministic sequence of distinct values: ``get(n)`` is always the same first ``n``."""

    def __init__(self, seed: int, draw, exclude=()) -> None:
        self._rng = random.Random(seed)
        self._draw = draw
        self._seen = set(exclude)
        self._items: list[str] = []

    def get(self, n: int) -> list[str]:
        misses = 0
        while len(self._items) < n:
            value = self._draw(self._rng)
            if value in self._seen:
                misses += 1
                if misses > 1000 + 10 * n:
                    raise LightTransferError(f"ran out of distinct values after {len(self._items)}.")
                continue
            self._seen.add(value)
            self._items.append(value)
        return self._items[:n]


def _depth_grid(n: int) -> list[float]:
    """``n`` evenly spaced depths from 0 to 1 (RULER samples needle depths from such a grid)."""
    return [i / (n - 1) for i in range(n)] if n > 1 else [0.5]


def _sample(task: str, length: int, fit: Fit, answers: list[str], metric: str, max_new_tokens: int,
            depth: float | None) -> RulerSample:
    return RulerSample(task=task, length=length, prompt=fit.prompt, input_ids=fit.input_ids,
                       answers=answers, metric=metric, max_new_tokens=max_new_tokens,
                       depth=None if depth is None else round(100.0 * depth, 2), haystack_size=fit.size)


def _join_keys(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


@dataclass(frozen=True)
class NeedleTask:
    """Needle in a haystack (RULER's ``niah_*``).

    Attributes:
        name: the task name.
        haystack: ``"noise"``, ``"essay"`` or ``"needle"`` (a haystack of distractor needles only).
        key_type: ``"words"`` (two vocabulary words, ``silent-orchard``) or ``"uuids"``.
        value_type: ``"numbers"`` (7 digits) or ``"uuids"``.
        num_keys: needles with distinct keys placed in a noise/essay haystack (the queried ones among them);
            a ``needle`` haystack has as many distractor keys as fit.
        num_values: values per key (each its own needle); all must be recalled.
        num_queries: keys asked about at once (at most ``num_keys``).
        num_depths: size of the depth grid the needles' depths are drawn from.
        max_new_tokens: generation budget in tokens.
        metric: ``"all"``.
    """

    name: str
    haystack: str = "essay"
    key_type: str = "words"
    value_type: str = "numbers"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    num_depths: int = 40
    max_new_tokens: int = 128
    metric: str = "all"

    def _draw_key(self, vocab):
        return random_uuid if self.key_type == "uuids" else (lambda rng: random_key(rng, vocab))

    def _draw_value(self):
        return random_uuid if self.value_type == "uuids" else random_number

    def build(self, rng: random.Random, haystack: Haystack, tokenizer, length: int) -> RulerSample:
        """A sample of at most ``length`` tokens (see the class docstring)."""
        vocab = shipped_vocabulary()
        draw_key, draw_value = self._draw_key(vocab), self._draw_value()
        n_keys = max(self.num_keys, self.num_queries)
        keys = distinct(rng, n_keys, draw_key)
        values = {k: distinct(rng, self.num_values, draw_value) for k in keys}
        queries = keys[: self.num_queries]
        kind = "UUIDs" if self.value_type == "uuids" else "numbers"
        one = "UUID" if self.value_type == "uuids" else "number"
        needles = [(k, v) for k in keys for v in values[k]]
        grid = _depth_grid(self.num_depths)
        if len(needles) <= len(grid):
            depths = rng.sample(grid, len(needles))
        else:
            depths = [rng.choice(grid) for _ in needles]
        placed = [(d, f"A special magic {one} for {k} is: {v}.")
                  for d, (k, v) in zip(depths, needles, strict=True)]
        query_depth = depths[0]
        intro = (f"Some special magic {kind} are hidden in the text below. Read it carefully and remember "
                 f"them: you will be asked about the {kind} afterwards.\n\n")
        qtext = _join_keys(queries)
        question = (f"\n\nWhat are all the special magic {kind} for {qtext} given in the text above? "
                    f"Answer: The special magic {kind} for {qtext} given in the text above are")
        answers = [v for k in queries for v in values[k]]

        if self.haystack == "needle":
            key_pool = _Pool(rng.getrandbits(64), draw_key, exclude=keys)
            value_pool = _Pool(rng.getrandbits(64), draw_value, exclude=answers)

            def distractors(n: int) -> list[str]:
                return [f"A special magic {one} for {k} is: {v}."
                        for k, v in zip(key_pool.get(n), value_pool.get(n), strict=True)]

            noise = noise_haystack()

            def render2(n: int, pad: int) -> str:
                lead = " ".join(noise.take(pad))
                body = insert_at_depths(distractors(n), placed, sep="\n")
                return intro + (lead + "\n" if lead else "") + body + question

            fit = fit_prompt(lambda n: render2(n, 0), tokenizer, length, task=self.name)
            n = fit.size
            fit = fit_prompt(lambda p: render2(n, p), tokenizer, length, task=self.name)
            fit = Fit(size=n, prompt=fit.prompt, input_ids=fit.input_ids)
        else:
            hay = noise_haystack() if self.haystack == "noise" else haystack.with_offset(
                rng.choice(haystack.sentence_starts))

            def render(n: int) -> str:
                return intro + insert_at_depths(hay.take(n), placed) + question

            fit = fit_prompt(render, tokenizer, length, task=self.name)
        return _sample(self.name, length, fit, answers, self.metric, self.max_new_tokens, query_depth)


@dataclass(frozen=True)
class VariableTracking:
    """Variable tracking (RULER's ``vt``): follow chains of assignments hidden in the noise haystack.

    Attributes:
        name: the task name.
        num_chains: independent chains, each with its own 5-digit value (the first one is asked about).
        num_hops: assignments ``VAR B = VAR A`` after the first ``VAR A = 12345`` in each chain; the answer
            has ``num_hops + 1`` variable names.
        max_new_tokens: generation budget in tokens.
        metric: ``"all"``.
    """

    name: str = "vt"
    num_chains: int = 1
    num_hops: int = 1
    max_new_tokens: int = 30
    metric: str = "all"

    def build(self, rng: random.Random, haystack: Haystack, tokenizer, length: int) -> RulerSample:
        """A sample of at most ``length`` tokens (see the class docstring)."""
        per_chain = self.num_hops + 1
        names = distinct(rng, self.num_chains * per_chain, variable_name)
        values = distinct(rng, self.num_chains, lambda r: random_number(r, 5))
        chains = [names[c * per_chain:(c + 1) * per_chain] for c in range(self.num_chains)]
        statements = []
        for chain, value in zip(chains, values, strict=True):
            lines = [f"VAR {chain[0]} = {value}."]
            lines += [f"VAR {chain[i]} = VAR {chain[i - 1]}." for i in range(1, per_chain)]
            statements.append(lines)
        depths = sorted(rng.random() for _ in range(self.num_chains * per_chain))
        order = [c for c in range(self.num_chains) for _ in range(per_chain)]
        rng.shuffle(order)
        nxt = [0] * self.num_chains
        placed = []
        for d, c in zip(depths, order, strict=True):
            placed.append((d, statements[c][nxt[c]]))
            nxt[c] += 1
        first_depth = depths[order.index(0)]
        hay = noise_haystack()
        intro = "Memorize the chains of variable assignments hidden in the text below and track them.\n\n"
        question = (f"\n\nQuestion: Which variables are assigned the value {values[0]} in the text above? "
                    f"Answer: Following the chains of assignments in the text above, {per_chain} variables "
                    f"are assigned the value {values[0]}; they are:")

        def render(n: int) -> str:
            return intro + insert_at_depths(hay.take(n), placed) + question

        fit = fit_prompt(render, tokenizer, length, task=self.name)
        return _sample(self.name, length, fit, list(chains[0]), self.metric, self.max_new_tokens, first_depth)


@dataclass(frozen=True)
class CommonWords:
    """Common words extraction (RULER's ``cwe``): a numbered list where some words recur far more often.

    The haystack size is the number of uncommon words. RULER's counts (30 and 3) need about
    ``full_length`` = 4096 tokens for the common words alone; below that the common words' count is scaled
    down in proportion to the length, never below ``freq_uncommon + 2``, so the answer stays unambiguous.
    When the vocabulary runs out before the target is reached (very long targets), both counts are
    multiplied by 2, 3, ... until it is.

    Attributes:
        name: the task name.
        num_common: words to name (they are the answers).
        freq_common: how often each common word occurs (at ``full_length`` tokens and beyond).
        freq_uncommon: how often each uncommon word occurs.
        full_length: the length in tokens from which ``freq_common`` is used unscaled.
        max_new_tokens: generation budget in tokens.
        metric: ``"all"``.
    """

    name: str = "cwe"
    num_common: int = 10
    freq_common: int = 30
    freq_uncommon: int = 3
    full_length: int = 4096
    max_new_tokens: int = 120
    metric: str = "all"

    def common_count(self, length: int) -> int:
        """How often each common word occurs at ``length`` tokens (before any vocabulary-driven scaling)."""
        scaled = round(self.freq_common * length / self.full_length)
        return max(self.freq_uncommon + 2, min(self.freq_common, scaled))

    def build(self, rng: random.Random, haystack: Haystack, tokenizer, length: int) -> RulerSample:
        """A sample of at most ``length`` tokens (see the class docstring)."""
        words = list(shipped_vocabulary())
        rng.shuffle(words)
        common, pool = words[: self.num_common], words[self.num_common:]
        base = rng.getrandbits(64)
        intro = ("Below is a numbered list of words. Some of the words occur in it many times, others only a "
                 "few times. Remember the ones that occur most often.\n\n")
        question = (f"\n\nQuestion: Which {self.num_common} words occur most often in the list above? "
                    f"Answer: The {self.num_common} words that occur most often in the list above are:")
        fc0 = self.common_count(length)
        for mult in range(1, 1000):
            fc, fu = fc0 * mult, self.freq_uncommon * mult

            def render(n: int, fc=fc, fu=fu) -> str:
                items = [w for w in common for _ in range(fc)] + [w for w in pool[:n] for _ in range(fu)]
                random.Random(f"{base}:{n}:{fc}").shuffle(items)
                return intro + "\n".join(f"{i}. {w}" for i, w in enumerate(items, 1)) + question

            fit = fit_prompt(render, tokenizer, length, task=self.name, max_size=len(pool))
            if fit.size < len(pool) or len(fit.input_ids) >= 0.97 * length:
                break
        return _sample(self.name, length, fit, common, self.metric, self.max_new_tokens, None)


@lru_cache(maxsize=4)
def _zipf_norm(alpha: float, terms: int = 100_000) -> float:
    return sum(r ** -alpha for r in range(1, terms + 1))


@dataclass(frozen=True)
class FrequentWords:
    """Frequent words extraction (RULER's ``fwe``): made-up words with Zipf-like counts.

    For a haystack of ``n`` words, the word of rank ``r`` occurs ``round(n * r**-alpha / zeta(alpha))``
    times, for every rank with at least one occurrence (counts are exact, not sampled, so the top words are
    strictly ordered); the occurrences are shuffled. The coded words are random lowercase strings of
    ``word_len`` letters.

    Attributes:
        name: the task name.
        alpha: the Zipf exponent (RULER: 2.0).
        num_answers: how many of the most frequent words to name.
        word_len: letters per coded word.
        max_new_tokens: generation budget in tokens.
        metric: ``"all"``.
    """

    name: str = "fwe"
    alpha: float = 2.0
    num_answers: int = 3
    word_len: int = 6
    max_new_tokens: int = 50
    metric: str = "all"

    def counts(self, n: int) -> list[int]:
        """Occurrences of each rank for a haystack of about ``n`` words (strictly decreasing at the top)."""
        norm = _zipf_norm(self.alpha)
        out = []
        r = 1
        while True:
            c = round(n * r ** -self.alpha / norm)
            if c < 1:
                break
            out.append(c)
            r += 1
        return out

    def min_words(self) -> int:
        """The smallest haystack whose top ``num_answers + 1`` counts are strictly decreasing."""
        n = 1
        while True:
            c = self.counts(n)
            if len(c) > self.num_answers and all(c[i] > c[i + 1] for i in range(self.num_answers)):
                return n
            n += 1

    def build(self, rng: random.Random, haystack: Haystack, tokenizer, length: int) -> RulerSample:
        """A sample of at most ``length`` tokens (see the class docstring)."""
        pool = _Pool(rng.getrandbits(64), lambda r: coded_word(r, self.word_len))
        base = rng.getrandbits(64)
        intro = ("Below is a coded text made of invented words. Keep count of how often each coded word "
                 "occurs.\n\n")
        question = (f"\n\nQuestion: Which {self.num_answers} coded words occur most often in the coded text "
                    f"above? Answer: The {self.num_answers} most frequent coded words in the text above are:")

        def render(n: int) -> str:
            counts = self.counts(n)
            vocab = pool.get(len(counts))
            items = [w for w, c in zip(vocab, counts, strict=True) for _ in range(c)]
            random.Random(f"{base}:{n}").shuffle(items)
            return intro + " ".join(items) + question

        fit = fit_prompt(render, tokenizer, length, task=self.name, min_size=self.min_words())
        answers = pool.get(self.num_answers)
        return _sample(self.name, length, fit, answers, self.metric, self.max_new_tokens, None)


_TITLES = frozenset({"mr", "mrs", "miss", "ms", "sir", "lady", "lord", "dr", "madam", "madame", "colonel",
                     "captain", "master", "mistress", "chapter", "volume", "god"})
_WORD = re.compile(r"[A-Za-z]+")


@lru_cache(maxsize=4)
def _qa_index(text: str) -> tuple[tuple[str, ...], frozenset[str], frozenset[str], str]:
    """``(sentences, names, frequent names, normalized text)`` of an essay (names: see the module docstring).

    The frequent names are the 10 most frequent ones; a model that guesses a main character's name would
    often be right if they were answers, so sentences without them are preferred.
    """
    norm = normalize(text)
    tokens = _WORD.findall(norm)
    lower = {w for w in tokens if w.islower()}
    counts = Counter(w for w in tokens if len(w) >= 3 and w[0].isupper() and w[1:].islower()
                     and w.lower() not in lower and w.lower() not in _TITLES)
    frequent = frozenset(w for w, _ in counts.most_common(10))
    return tuple(split_sentences(norm)), frozenset(counts), frequent, norm


@dataclass(frozen=True)
class PlantedSentenceQA:
    """Our QA task ("lighttransfer-qa"): which name is in the sentence that begins with the quoted words?

    Attributes:
        name: the task name.
        prefix_words: words of the sentence quoted in the question (more, up to ``max_prefix_words``, when
            needed to make the quote occur only once in the essay).
        max_prefix_words: the longest quote tried.
        min_words, max_words: the planted sentence's length in words.
        num_depths: size of the depth grid the planting depth is drawn from.
        max_new_tokens: generation budget in tokens.
        metric: ``"part"`` (any of the sentence's names counts).
    """

    name: str = "qa_haystack"
    prefix_words: int = 5
    max_prefix_words: int = 10
    min_words: int = 10
    max_words: int = 45
    num_depths: int = 40
    max_new_tokens: int = 32
    metric: str = "part"

    def pick(self, rng: random.Random, text: str) -> tuple[str, str, list[str]]:
        """``(sentence, quoted prefix, names)`` for a random qualifying sentence of ``text``."""
        sentences, names, frequent, norm = _qa_index(text)
        for attempt in range(6000):
            avoid = frequent if attempt < 3000 else frozenset()
            sentence = sentences[rng.randrange(len(sentences))]
            words = sentence.split()
            if not self.min_words <= len(words) <= self.max_words or not sentence[0].isalpha():
                continue
            for k in range(self.prefix_words, self.max_prefix_words + 1):
                head = words[:k]
                if any(w in names for w in _WORD.findall(" ".join(head))):
                    break
                found = [w for w in _WORD.findall(" ".join(words[k:])) if w in names]
                if not found or any(w in avoid for w in found):
                    break
                prefix = " ".join(head)
                if norm.count(prefix) == 1:
                    return sentence, prefix, list(dict.fromkeys(found))
        raise LightTransferError(
            f"ruler task {self.name}: the essay text has no sentence of {self.min_words}-{self.max_words} "
            "words with a name (a capitalized word never written in lowercase) after a unique opening; "
            "pass another text."
        )

    def build(self, rng: random.Random, haystack: Haystack, tokenizer, length: int) -> RulerSample:
        """A sample of at most ``length`` tokens (see the class docstring)."""
        sentence, prefix, found = self.pick(rng, haystack.text)
        depth = rng.choice(_depth_grid(self.num_depths))
        hay = haystack.with_offset(rng.choice(haystack.sentence_starts))
        intro = "Read the text below carefully; a question about one of its sentences follows.\n\n"
        question = (f"\n\nQuestion: One sentence of the text above begins with \"{prefix}\". Which name "
                    "(of a person or a place) occurs in that sentence? Answer: The name in that sentence is")

        def render(n: int) -> str:
            return intro + insert_at_depths(hay.take(n), [(depth, sentence)]) + question

        fit = fit_prompt(render, tokenizer, length, task=self.name)
        return _sample(self.name, length, fit, found, self.metric, self.max_new_tokens, depth)


__all__ = ["CommonWords", "FrequentWords", "NeedleTask", "PlantedSentenceQA", "VariableTracking"]
