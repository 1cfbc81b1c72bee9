"""Words, numbers and UUIDs for keys, values and the word-extraction tasks, all generated offline.

No third-party word list is shipped. The vocabulary is derived from a text (by default lighttransfer's
shipped calibration text): its lowercase alphabetic words of 3-12 letters, de-duplicated and sorted, keeping
those seen at least ``min_count`` times (drops typos and rare archaic spellings) and dropping the
``drop_top`` most frequent ones (function words such as "the", "and", which also occur in the task templates).
Capitalized words are ignored, so names do not become keys. Numbers, UUIDs and the coded words of ``fwe``
come from the caller's ``random.Random``; nothing depends on the global random state.
"""

from __future__ import annotations

import random
import re
import string
import uuid
from collections import Counter
from functools import lru_cache

from ...errors import LightTransferError

_WORD = re.compile(r"[A-Za-z]+")


def vocabulary(text: str, *, min_count: int = 2, drop_top: int = 100, min_len: int = 3,
               max_len: int = 12) -> tuple[str, ...]:
    """The sorted vocabulary of ``text`` (see the module docstring); raises if fewer than 50 words remain."""
    return _vocabulary(text, min_count, drop_top, min_len, max_len)


@lru_cache(maxsize=8)
def _vocabulary(text: str, min_count: int, drop_top: int, min_len: int, max_len: int) -> tuple[str, ...]:
    counts = Counter(w for w in _WORD.findall(text) if w.islower() and min_len <= len(w) <= max_len)
    ranked = sorted(counts, key=lambda w: (-counts[w], w))
    dropped = set(ranked[:drop_top])
    words = sorted(w for w, c in counts.items() if c >= min_count and w not in dropped)
    if len(words) < 50:
        raise LightTransferError(
            f"the vocabulary text yields only {len(words)} usable words (need 50); pass a longer text."
        )
    return tuple(words)


def shipped_vocabulary() -> tuple[str, ...]:
    """:func:`vocabulary` of lighttransfer's shipped calibration text."""
    from ...calibration import SHIPPED_TEXT

    return vocabulary(SHIPPED_TEXT.read_text(encoding="utf-8"))


def random_number(rng: random.Random, digits: int = 7) -> str:
    """A ``digits``-digit decimal number without a leading zero, as a string (RULER uses 7 digits)."""
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def random_uuid(rng: random.Random) -> str:
    """A version-4 UUID string drawn from ``rng``."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def random_key(rng: random.Random, vocab: tuple[str, ...]) -> str:
    """A key of two vocabulary words joined by a hyphen (``"silent-orchard"``)."""
    return f"{rng.choice(vocab)}-{rng.choice(vocab)}"


def distinct(rng: random.Random, n: int, draw, *, exclude=()) -> list[str]:
    """``n`` distinct values of the zero-argument ``draw(rng)``, none in ``exclude``, in draw order."""
    seen = set(exclude)
    out: list[str] = []
    for _ in range(1000 * n + 1000):
        if len(out) == n:
            break
        value = draw(rng)
        if value not in seen:
            seen.add(value)
            out.append(value)
    if len(out) < n:
        raise LightTransferError(f"could not draw {n} distinct values; the vocabulary is too small.")
    return out


def coded_word(rng: random.Random, length: int = 6) -> str:
    """A made-up lowercase word of ``length`` letters (the coded vocabulary of ``fwe``)."""
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(length))


def variable_name(rng: random.Random, length: int = 5) -> str:
    """An uppercase variable name of ``length`` letters (``vt``)."""
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(length))


__all__ = ["coded_word", "distinct", "random_key", "random_number", "random_uuid", "shipped_vocabulary",
           "variable_name", "vocabulary"]
