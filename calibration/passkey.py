"""Passkey samples: a 5-digit key hidden at a chosen depth in real filler text, then a question asking for it.

Layout of one sample (token ids, exactly ``length_tokens`` of them)::

    [BOS] intro | filler[:split] | needle | filler[split:] | question

* intro: "There is a pass key hidden inside a lot of irrelevant text. Find it and remember it."
* needle: "The pass key is 12345. Remember it. 12345 is the pass key."
* question: "What is the pass key? The pass key is" -- the model should continue with the key.
* other ``template`` values swap the wording for a different retrieval task (a vault's combination, a ticket
  number, a telephone number, a password, a number on record, a door code in a note, a locker number), each
  recalled after its own question. Gate optimization
  trains on :data:`TRAINING_TEMPLATES`; :data:`HELD_OUT_TEMPLATES` are kept for checking that what was learned
  carries over to a wording never seen in training.
* filler: consecutive tokens of real prose (by default the shipped Austen text), starting at a seeded offset;
  ``split = round(depth * len(filler))``, so depth 0 puts the needle right after the intro and depth 1 right
  before the question.

Answering needs attention from the last tokens back to the needle, far beyond any recent window: heads that
do this show up in the analysis' long-context score, and the same builder serves the passkey evaluation.
The pieces are tokenized separately and concatenated, so the sample length is exact for every tokenizer.
"""

from __future__ import annotations

import random
from typing import NamedTuple

import torch

from ..errors import LightTransferError

INTRO = "There is a pass key hidden inside a lot of irrelevant text. Find it and remember it.\n\n"
NEEDLE = "\n{key} is important. The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"
# what follows every question: the key after a space (the evaluation scores it, fine-tuning trains on it)
ANSWER = " {key}"


class Template(NamedTuple):
    """The fixed text around the filler: ``needle`` holds ``{key}``; the answer follows ``question``."""

    intro: str
    needle: str
    question: str


TEMPLATES = {
    "passkey": Template(INTRO, NEEDLE, QUESTION),
    "vault": Template(
        "These pages come from an old book. The combination of a vault is written somewhere among them.\n\n",
        "\nThe combination of the vault is {key}. The vault opens with {key}.\n",
        "\n\nWhat opens the vault? The combination of the vault is",
    ),
    "ticket": Template(
        "Read the story below. It mentions a ticket number once; you will be asked for it at the end.\n\n",
        "\n(The ticket number is {key}; ticket {key} must be kept.)\n",
        "\n\nQuestion: what was the ticket number?\nAnswer: The ticket number was",
    ),
    "phone": Template(
        "A long letter follows. Somewhere in it, the writer gives a telephone number.\n\n",
        "\nYou can reach me at {key}; my number is {key}.\n",
        "\n\nAt what number can the writer be reached? The number is",
    ),
    "password": Template(
        "The text below hides a password. Read it carefully.\n\n",
        "\nThe secret password is {key}. Do not forget {key}.\n",
        "\n\nI have forgotten the password. The secret password is",
    ),
    "record": Template(
        "Read the following chapters. One line records a number worth remembering.\n\n",
        "\nFor the record, the number to remember is {key} ({key}).\n",
        "\n\nWhich number was worth remembering? The number to remember is",
    ),
    "needle": Template(
        "Below is a long excerpt of a novel. A short note is hidden somewhere inside it.\n\n",
        "\nNote: the code of the blue door is {key}. Again, the code of the blue door is {key}.\n",
        "\n\nAfter reading the excerpt, recall the note. The code of the blue door is",
    ),
    "locker": Template(
        "Here is a long passage from a book, with one sentence about a locker in it.\n\n",
        "\nMy locker number is {key}, locker {key}.\n",
        "\n\nWhich locker was mine? My locker number is",
    ),
}

# The gate optimization trains on these wordings by default; the other two stay out of training, so an
# evaluation on them shows whether what the gates learned carries over to a wording they never saw.
TRAINING_TEMPLATES = ("passkey", "vault", "ticket", "phone", "password", "record")
HELD_OUT_TEMPLATES = ("needle", "locker")


def check_templates(names, *, option: str = "passkey format") -> tuple[str, ...]:
    """``names`` (a sequence, or a comma-separated string as an option gives it) as a tuple after checking each
    is a key of :data:`TEMPLATES` (one-line error naming ``option`` otherwise)."""
    if isinstance(names, str):
        names = [name.strip() for name in names.split(",") if name.strip()]
    names = tuple(names)
    unknown = [n for n in names if n not in TEMPLATES]
    if unknown or not names:
        raise LightTransferError(f"{option} '{','.join(unknown) or ''}' is not known; use one or more of "
                                 f"{', '.join(TEMPLATES)}.")
    return names


_token_cache: dict[tuple[int, int, int], list[int]] = {}


class PasskeySample(NamedTuple):
    """One passkey prompt.

    Attributes:
        input_ids: ``[length_tokens]`` int64 token ids, ending with the question (no answer).
        answer: the key, 5 digits as a string; a correct model continues the prompt with it.
    """

    input_ids: torch.Tensor
    answer: str


def token_ids(tokenizer, text: str) -> list[int]:
    """``text`` tokenized without special tokens (cached per tokenizer and text: filler is reused a lot)."""
    key = (id(tokenizer), len(text), hash(text))
    ids = _token_cache.get(key)
    if ids is None:
        ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if len(_token_cache) > 16:
            _token_cache.clear()
        _token_cache[key] = ids
    return ids


def bos_prefix(tokenizer) -> list[int]:
    """``[bos_token_id]`` when the tokenizer puts a BOS in front of text by default, else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if probe and probe[0] == bos else []


def make_passkey_sample(
    tokenizer,
    filler_text: str,
    *,
    length_tokens: int,
    depth: float,
    seed: int = 0,
    template: str = "passkey",
) -> PasskeySample:
    """Build one passkey prompt of exactly ``length_tokens`` tokens with the needle at ``depth``.

    Args:
        tokenizer: a transformers tokenizer.
        filler_text: real prose to hide the key in (repeated when shorter than needed).
        length_tokens: total prompt length in tokens, BOS and question included.
        depth: where the needle sits in the filler, 0 (start) .. 1 (end).
        seed: picks the key and the filler's starting offset; same seed, same sample.
        template: the wording, a key of :data:`TEMPLATES`.

    Returns:
        :class:`PasskeySample` ``(input_ids [length_tokens] int64, answer)``.

    Raises:
        LightTransferError: ``depth`` outside [0, 1], empty filler, or ``length_tokens`` too short to hold the
            intro, needle and question.
    """
    if not 0.0 <= depth <= 1.0:
        raise LightTransferError(f"passkey depth must be between 0 and 1, got {depth}.")
    check_templates((template,))
    words = TEMPLATES[template]
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    bos = bos_prefix(tokenizer)
    intro = token_ids(tokenizer, words.intro)
    needle = token_ids(tokenizer, words.needle.format(key=key))
    question = token_ids(tokenizer, words.question)
    budget = length_tokens - len(bos) - len(intro) - len(needle) - len(question)
    if budget < 0:
        fixed = length_tokens - budget
        raise LightTransferError(
            f"a passkey sample needs at least {fixed} tokens for its intro, key and question; "
            f"{length_tokens} were asked for: raise --seq-len."
        )
    filler = token_ids(tokenizer, filler_text)
    if not filler:
        raise LightTransferError("the passkey filler text is empty; pass real text to hide the key in.")
    while len(filler) < budget:
        filler = filler + filler
    start = rng.randrange(0, len(filler) - budget + 1)
    chunk = filler[start : start + budget]
    split = round(depth * budget)
    ids = bos + intro + chunk[:split] + needle + chunk[split:] + question
    assert len(ids) == length_tokens
    return PasskeySample(input_ids=torch.tensor(ids, dtype=torch.long), answer=key)


def passkey_samples(
    tokenizer, filler_text: str, *, seq_len: int, samples: int, seed: int = 0
) -> tuple[torch.Tensor, list[float]]:
    """``samples`` passkey prompts of ``seq_len`` tokens, needles at evenly spread depths in a seeded order.

    Returns:
        ``(input_ids [samples, seq_len] int64, depths)``.
    """
    rng = random.Random(seed)
    depths = [(i + 0.5) / samples for i in range(samples)]
    rng.shuffle(depths)
    rows = [
        make_passkey_sample(tokenizer, filler_text, length_tokens=seq_len, depth=d, seed=rng.randrange(2**31))
        for d in depths
    ]
    return torch.stack([r.input_ids for r in rows]), depths


__all__ = [
    "ANSWER",
    "HELD_OUT_TEMPLATES",
    "TEMPLATES",
    "TRAINING_TEMPLATES",
    "PasskeySample",
    "Template",
    "bos_prefix",
    "check_templates",
    "make_passkey_sample",
    "passkey_samples",
    "token_ids",
]
