"""Haystacks: the distracting text that needles, variable assignments and planted sentences hide in.

Two kinds, as in RULER:

* ``noise``: the five filler sentences of :data:`NOISE` repeated ("The grass is green. ...").
* ``essay``: real long text given by the caller (lighttransfer ships one, ``calibration.SHIPPED_TEXT``).

Both are the same object: a text is normalized (runs of whitespace become one space), split into sentences,
and read as an endless cycle of words starting at a given word offset (tasks start at a random sentence).
``take(n_words)`` returns the first ``n_words`` words as a list of sentences; the last one may stop
mid-sentence, so the haystack size can be tuned one word at a time (sizes are in words, never in tokens: the
fitter turns tokens into words). Texts shorter than the request repeat from their start.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from ...errors import LightTransferError

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

# a sentence ends at . ! or ? (optionally followed by a closing quote or bracket) before whitespace
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'\u201d\u2019)\]]*(?=\s)")
# a full stop after these words ends an abbreviation, not a sentence
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "messrs", "mme", "mlle", "no", "vs", "etc", "jr",
                            "sr"})


def normalize(text: str) -> str:
    """``text`` with every run of whitespace (newlines, double spaces) replaced by one space, stripped."""
    return " ".join(text.split())


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (after :func:`normalize`), stripped; a full stop after Mr, Mrs, ... ends none."""
    text = normalize(text)
    out, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        end = match.end()
        piece = text[start:end].strip()
        last = piece.rsplit(" ", 1)[-1].rstrip(".").lower()
        if not piece or (last in _ABBREVIATIONS and piece.endswith(".")):
            continue
        out.append(piece)
        start = end
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


@dataclass(frozen=True)
class Haystack:
    """A source of filler words read as an endless cycle.

    Args:
        kind: ``"noise"`` or ``"essay"`` (only recorded; the text decides what is read).
        text: the source text; any string with at least one word.
        offset: the word (counted in the normalized text) where reading starts; taken modulo its word count.
    """

    kind: str
    text: str
    offset: int = 0

    def __post_init__(self) -> None:
        if not self.text.split():
            raise LightTransferError(f"the {self.kind} haystack text is empty; pass a text with words in it.")

    @cached_property
    def _words(self) -> tuple[tuple[str, ...], tuple[bool, ...]]:
        words: list[str] = []
        ends: list[bool] = []
        for sentence in split_sentences(self.text):
            parts = sentence.split()
            words.extend(parts)
            ends.extend([False] * (len(parts) - 1) + [True])
        return tuple(words), tuple(ends)

    @cached_property
    def sentence_starts(self) -> tuple[int, ...]:
        """Word indices (in one pass over the text) where a sentence begins."""
        ends = self._words[1]
        return (0, *(i + 1 for i, end in enumerate(ends[:-1]) if end))

    @property
    def word_count(self) -> int:
        """Words in one pass over the text (the cycle length)."""
        return len(self._words[0])

    def with_offset(self, offset: int) -> Haystack:
        """The same haystack read from another word offset."""
        return Haystack(self.kind, self.text, offset % self.word_count)

    def take(self, n_words: int) -> list[str]:
        """The next ``n_words`` words from the offset, grouped into sentences (the last may be cut short)."""
        words, ends = self._words
        total = len(words)
        sentences: list[str] = []
        current: list[str] = []
        for i in range(n_words):
            j = (self.offset + i) % total
            current.append(words[j])
            if ends[j]:
                sentences.append(" ".join(current))
                current = []
        if current:
            sentences.append(" ".join(current))
        return sentences


def noise_haystack() -> Haystack:
    """The repeated-filler haystack of RULER's ``niah_single_1`` and ``vt``."""
    return Haystack("noise", NOISE)


def essay_haystack(text: str, offset: int = 0) -> Haystack:
    """A haystack of real text ``text`` read from word ``offset``."""
    hay = Haystack("essay", text)
    return hay.with_offset(offset) if offset else hay


def insert_at_depths(sentences: list[str], items: list[tuple[float, str]], *, sep: str = " ") -> str:
    """Join ``sentences`` with ``sep``, putting each ``(depth, text)`` item between sentences.

    ``depth`` is a fraction in [0, 1]: 0 puts the item before the first sentence, 1 after the last; items at
    the same position keep their order. Returns the joined text.
    """
    slots: dict[int, list[str]] = {}
    for depth, text in items:
        slot = min(len(sentences), max(0, round(depth * len(sentences))))
        slots.setdefault(slot, []).append(text)
    out: list[str] = []
    for i in range(len(sentences) + 1):
        out.extend(slots.get(i, ()))
        if i < len(sentences):
            out.append(sentences[i])
    return sep.join(out)


__all__ = ["Haystack", "NOISE", "essay_haystack", "insert_at_depths", "noise_haystack", "normalize",
           "split_sentences"]
