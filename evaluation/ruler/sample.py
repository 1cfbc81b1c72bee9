"""One generated RULER sample: the prompt, its token ids, the reference answers and how to score them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class RulerSample:
    """A prompt of ``len(input_ids) <= length`` tokens and what a correct continuation contains.

    Attributes:
        task: the task name (``niah_single_1``, ``vt``, ...).
        length: the target length in tokens the prompt was fitted to.
        prompt: the full prompt text, ending with the answer prefix the model continues.
        input_ids: its token ids (with the tokenizer's special tokens), what the model is fed.
        answers: reference strings; the metric checks which of them occur in the generated text.
        metric: ``"all"`` (fraction of answers found) or ``"part"`` (any answer found).
        max_new_tokens: the generation budget in tokens.
        depth: where the queried item sits, in percent of the haystack (None where it does not apply).
        seed: the seed of this sample's own ``random.Random``.
        index: the sample's index among those of its (task, length).
        haystack_size: the fitted haystack size, in the task's units (words, needles, list items).
    """

    task: str
    length: int
    prompt: str
    input_ids: list[int]
    answers: list[str]
    metric: str
    max_new_tokens: int
    depth: float | None = None
    seed: int | None = None
    index: int = 0
    haystack_size: int = 0
    schema_version: int = field(default=SCHEMA_VERSION)

    def to_dict(self) -> dict:
        """A JSON-ready dict with sorted keys."""
        d = asdict(self)
        d["input_ids"] = [int(i) for i in self.input_ids]
        return dict(sorted(d.items()))


__all__ = ["RulerSample", "SCHEMA_VERSION"]
