"""Fit a prompt to a target length in tokens by binary search on the haystack size, as RULER does.

A task hands over ``render(size) -> prompt text``, a pure function of one integer ``size`` (haystack words,
needles, list items, ...; its unit is the task's business) that grows with ``size``. :func:`fit_prompt`
finds the largest ``size`` whose prompt encodes to at most ``target`` tokens, so the prompt is never longer
than the target and falls short of it by less than one unit of ``size`` (tasks choose fine units, a word
where they can). Token counts are those of ``encode_prompt`` (the tokenizer's ``encode`` with its special
tokens, e.g. a BOS, included), so they equal ``len(sample.input_ids)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ...errors import LightTransferError


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's own special tokens (what the model is fed)."""
    return list(tokenizer.encode(text))


@dataclass(frozen=True)
class Fit:
    """The result of a fit: the chosen ``size`` (task units), the prompt text and its token ids."""

    size: int
    prompt: str
    input_ids: list[int]


def fit_prompt(render: Callable[[int], str], tokenizer, target: int, *, task: str, min_size: int = 0,
               max_size: int = 1 << 24) -> Fit:
    """The largest ``size`` in ``[min_size, max_size]`` whose ``render(size)`` is at most ``target`` tokens.

    Args:
        render: builds the prompt for a haystack ``size``; must be deterministic.
        tokenizer: anything with ``encode(text) -> ids``.
        target: the length budget in tokens.
        task: the task name, for the error message.
        min_size: the smallest size the task accepts (its fixed parts); if even that is too long, raises.
        max_size: an upper bound on the search.

    Raises:
        LightTransferError: one line naming the task and the length, when ``render(min_size)`` is too long.
    """
    cache: dict[int, list[int]] = {}

    def length(size: int) -> int:
        if size not in cache:
            cache[size] = encode_prompt(tokenizer, render(size))
        return len(cache[size])

    base = length(min_size)
    if base > target:
        raise LightTransferError(
            f"ruler task {task}: a length of {target} tokens is too short for its fixed parts "
            f"({base} tokens without any haystack); use a longer length."
        )
    # grow an upper bound from a probe's tokens per unit, then bisect
    lo, step = min_size, 16
    hi = min(max_size, min_size + step)
    while hi < max_size and length(hi) <= target:
        lo = hi
        per_unit = max((length(hi) - base) / max(hi - min_size, 1), 1e-3)
        guess = min_size + int((target - base) / per_unit * 1.05) + 1
        hi = min(max_size, max(guess, hi + step))
        step *= 2
    if length(hi) <= target:
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if length(mid) <= target:
            lo = mid
        else:
            hi = mid
    return Fit(size=lo, prompt=render(lo), input_ids=cache[lo])


__all__ = ["Fit", "encode_prompt", "fit_prompt"]
