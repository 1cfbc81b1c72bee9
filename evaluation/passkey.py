"""Passkey retrieval: a number hidden at a chosen depth of real text, asked for at the end.

A sample is ``intro + filler[:d] + needle + filler[d:] + question``, exactly ``length`` tokens long (built by
:func:`lighttransfer.calibration.make_passkey_sample`, the same builder the analysis uses), followed by the
answer tokens. The filler is real prose (not a repeated filler sentence), so the model has to retrieve the key
rather than spot the one odd line in a repetitive pattern. Success is exact greedy
reproduction of the key (:func:`~lighttransfer.evaluation.scoring.greedy_matches`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..calibration.passkey import ANSWER
from ..errors import LightTransferError
from .scoring import continuation_logits, greedy_matches


@dataclass(frozen=True)
class PasskeySample:
    """One passkey prompt and its answer.

    Attributes:
        prompt_ids: ``[length]`` int64 token ids, ending with the question.
        answer_ids: ``[n]`` int64 token ids of the answer (the key after a space, as the model would write it).
        key: the hidden number, as text.
        depth: where the needle sits, as a fraction of the filler (0 = start, 1 = end).
    """

    prompt_ids: torch.Tensor
    answer_ids: torch.Tensor
    key: str
    depth: float

    @property
    def length(self) -> int:
        return int(self.prompt_ids.numel())


def passkey_depths(count: int) -> list[float]:
    """``count`` depths evenly spread over ``[0, 1]`` (10 gives 0, 1/9, ..., 1)."""
    if count < 1:
        raise LightTransferError(f"--passkey-depths must be at least 1, got {count}.")
    return [0.5] if count == 1 else [i / (count - 1) for i in range(count)]


def make_sample(tokenizer, filler_text: str, *, length: int, depth: float, seed: int,
                template: str = "passkey") -> PasskeySample:
    """One sample of exactly ``length`` prompt tokens (the calibration package's builder) plus its answer ids."""
    from ..calibration import make_passkey_sample

    built = make_passkey_sample(tokenizer, filler_text, length_tokens=length, depth=depth, seed=seed,
                                template=template)
    answer = tokenizer(ANSWER.format(key=built.answer), add_special_tokens=False)["input_ids"]
    return PasskeySample(prompt_ids=built.input_ids, answer_ids=torch.tensor(answer, dtype=torch.long),
                         key=built.answer, depth=depth)


def passkey_samples(
    tokenizer, filler_text: str, *, lengths: Sequence[int], depths: Sequence[float], trials: int, seed: int = 0,
    template: str = "passkey",
) -> list[PasskeySample]:
    """Samples for every (length, depth, trial); keys and filler offsets drawn from ``seed``; ``template`` picks
    the wording (``calibration.passkey.TEMPLATES``)."""
    rng = random.Random(seed)
    return [
        make_sample(tokenizer, filler_text, length=length, depth=depth, seed=rng.randrange(2**31),
                    template=template)
        for length in lengths
        for depth in depths
        for _ in range(trials)
    ]


def check_answer(model, sample: PasskeySample, *, after_prefill=None) -> bool:
    """Whether greedy decoding after the prompt reproduces the key exactly."""
    device = next(model.parameters()).device
    ids = torch.cat([sample.prompt_ids, sample.answer_ids]).unsqueeze(0).to(device)
    logits = continuation_logits(model, ids, sample.length, after_prefill=after_prefill)
    return bool(greedy_matches(logits, ids[:, sample.length :])[0])


def passkey_accuracy(
    sequence: Callable, samples: Sequence[PasskeySample], *, on_sample: Callable[[], None] | None = None
) -> dict:
    """Accuracy of one row, overall and per ``(length, depth)``.

    Args:
        sequence: ``() -> context manager yielding (model, after_prefill)`` (a row's backend).
    Returns:
        ``{"accuracy", "n", "ci95": [low, high], "outcomes": [bool per sample, in order], "by_length": {L: acc},
        "grid": {L: {depth: acc}}}`` (accuracies in [0, 1]; ``ci95``: Wilson interval; ``outcomes`` lets two rows
        that answered the same samples be compared per prompt, :func:`~lighttransfer.evaluation.stats.paired_difference`).
    """
    from .stats import wilson_interval

    hits: dict[int, dict[float, list[bool]]] = {}
    outcomes = []
    for sample in samples:
        with sequence() as (model, after_prefill):
            ok = check_answer(model, sample, after_prefill=after_prefill)
        hits.setdefault(sample.length, {}).setdefault(round(sample.depth, 4), []).append(ok)
        outcomes.append(ok)
        if on_sample is not None:
            on_sample()
    grid = {str(L): {f"{d:.3f}": sum(v) / len(v) for d, v in sorted(by_d.items())} for L, by_d in sorted(hits.items())}
    by_length = {str(L): sum(sum(v) for v in by_d.values()) / sum(len(v) for v in by_d.values())
                 for L, by_d in sorted(hits.items())}
    low, high = wilson_interval(sum(outcomes), len(outcomes))
    return {"accuracy": sum(outcomes) / len(outcomes) if outcomes else 0.0, "n": len(outcomes),
            "ci95": [round(low, 4), round(high, 4)], "outcomes": outcomes, "by_length": by_length, "grid": grid}


__all__ = ["PasskeySample", "make_sample", "passkey_samples", "passkey_depths", "check_answer",
           "passkey_accuracy"]
