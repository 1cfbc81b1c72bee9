"""The RULER suite: the task registry, sample building, greedy generation and scoring, tables and plots.

* :data:`TASKS` maps each task name to its default task object; :data:`DEFAULT_TASKS` lists all of them.
* :func:`build_samples` makes ``samples_per_task`` prompts per (task, length); each (task, length, index)
  draws from its own ``random.Random`` seeded from ``(seed, task, length, index)``, so the same arguments
  give the same samples and adding or removing a task leaves the others' samples unchanged.
* :func:`run_samples` generates greedily for every sample with a model handed out by ``sequence()`` and
  scores it; the result is :meth:`RulerResult.to_dict` (scores in percent).
* :func:`markdown_table` and :func:`heatmap` present results.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import LightTransferError
from .haystack import essay_haystack
from .sample import SCHEMA_VERSION, RulerSample
from .scoring import aggregate, score
from .tasks import CommonWords, FrequentWords, NeedleTask, PlantedSentenceQA, VariableTracking

TASKS: dict[str, object] = {
    "niah_single_1": NeedleTask("niah_single_1", haystack="noise"),
    "niah_single_2": NeedleTask("niah_single_2", haystack="essay"),
    "niah_single_3": NeedleTask("niah_single_3", haystack="essay", value_type="uuids"),
    "niah_multikey_1": NeedleTask("niah_multikey_1", haystack="essay", num_keys=4),
    "niah_multikey_2": NeedleTask("niah_multikey_2", haystack="needle"),
    "niah_multikey_3": NeedleTask("niah_multikey_3", haystack="needle", key_type="uuids", value_type="uuids"),
    "niah_multivalue": NeedleTask("niah_multivalue", haystack="essay", num_values=4),
    "niah_multiquery": NeedleTask("niah_multiquery", haystack="essay", num_keys=4, num_queries=4),
    "vt": VariableTracking(),
    "cwe": CommonWords(),
    "fwe": FrequentWords(),
    "qa_haystack": PlantedSentenceQA(),
}
DEFAULT_TASKS: tuple[str, ...] = tuple(TASKS)


def check_tasks(spec: str | Iterable[str]) -> list[str]:
    """Task names from ``"niah_single_1,vt"`` (or a list), in the given order without repeats.

    Raises:
        LightTransferError: one line naming the unknown task(s) and listing the known ones.
    """
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = list(dict.fromkeys(n for n in names if n))
    if not names:
        raise LightTransferError(f"no RULER task given; choose from {', '.join(TASKS)}.")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise LightTransferError(
            f"unknown RULER task(s) {', '.join(unknown)}; known tasks: {', '.join(TASKS)}."
        )
    return names


def sample_seed(seed: int, task: str, length: int, index: int) -> int:
    """The seed of one sample's ``random.Random``: 64 bits of SHA-256 of ``seed:task:length:index``."""
    digest = hashlib.sha256(f"{seed}:{task}:{length}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _essay_text(essay_text: str | None) -> str:
    if essay_text is not None:
        return essay_text
    from ...calibration import SHIPPED_TEXT

    return SHIPPED_TEXT.read_text(encoding="utf-8")


def build_samples(tokenizer, *, lengths: Sequence[int], samples_per_task: int,
                  tasks: str | Iterable[str] = DEFAULT_TASKS, essay_text: str | None = None,
                  seed: int = 0) -> list[RulerSample]:
    """``samples_per_task`` samples for every task and length, ordered by task, then length, then index.

    Args:
        tokenizer: anything with ``encode(text) -> ids`` (the model's tokenizer; prompts are fitted to it).
        lengths: target prompt lengths in tokens.
        samples_per_task: samples per (task, length).
        tasks: task names (see :func:`check_tasks`).
        essay_text: the essay haystack's text; lighttransfer's shipped text when None.
        seed: the suite seed.
    """
    names = check_tasks(tasks)
    if samples_per_task < 1:
        raise LightTransferError(f"samples per task must be at least 1, got {samples_per_task}.")
    if not lengths or any(int(n) < 1 for n in lengths):
        raise LightTransferError(f"RULER lengths must be positive token counts, got {list(lengths)}.")
    hay = essay_haystack(_essay_text(essay_text))
    out: list[RulerSample] = []
    for name in names:
        task = TASKS[name]
        for length in lengths:
            for index in range(samples_per_task):
                s = sample_seed(seed, name, int(length), index)
                sample = task.build(random.Random(s), hay, tokenizer, int(length))
                out.append(_with(sample, seed=s, index=index))
    return out


def _with(sample: RulerSample, **changes) -> RulerSample:
    from dataclasses import replace

    return replace(sample, **changes)


@dataclass
class RulerResult:
    """Scores of a RULER run, in percent.

    Attributes:
        samples: one outcome per sample, in run order: task, length, index, depth, score, prediction,
            answers, new_tokens; ``to_dict`` adds ``outcomes``, the scores alone, to pair two runs.
        by_task: mean score per task.
        by_task_length: ``{task: {str(length): mean score}}``.
        average: the mean of the per-task means.
    """

    samples: list[dict] = field(default_factory=list)
    by_task: dict[str, float] = field(default_factory=dict)
    by_task_length: dict[str, dict[str, float]] = field(default_factory=dict)
    average: float = 0.0
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_outcomes(cls, outcomes: list[dict]) -> RulerResult:
        """Aggregate per-sample outcome dicts (each with ``task``, ``length`` and ``score``)."""
        agg = aggregate((o["task"], o["length"], o["score"]) for o in outcomes)
        return cls(samples=list(outcomes), **agg)

    def to_dict(self) -> dict:
        """A JSON-ready dict with sorted keys."""
        d = {"samples": [dict(sorted(o.items())) for o in self.samples],
             "outcomes": [o["score"] for o in self.samples], "by_task": self.by_task,
             "by_task_length": self.by_task_length, "average": self.average,
             "schema_version": self.schema_version}
        return dict(sorted(d.items()))


def _eos_ids(tokenizer, eos_token_id) -> set[int]:
    value = getattr(tokenizer, "eos_token_id", None) if eos_token_id is None else eos_token_id
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple, set)) else {int(value)}


def _last_logits_only(model) -> dict:
    """Forward keywords for only the last position's logits (a full ``[seq, vocab]`` block would not fit at long
    lengths), where the model's forward takes ``logits_to_keep``."""
    keeps = "logits_to_keep" in inspect.signature(type(model).forward).parameters
    return {"logits_to_keep": 1} if keeps else {}


def greedy_generate(model, input_ids: list[int], max_new_tokens: int, eos: set[int],
                    after_prefill: Callable[[], None] | None = None) -> list[int]:
    """Greedy tokens after ``input_ids``: one prefill forward, then one forward per new token.

    Stops after ``max_new_tokens`` tokens or at the first token in ``eos`` (which is kept). Calls
    ``after_prefill()`` once, right after the prefill forward. Call under ``torch.inference_mode()``.
    """
    import torch

    from ...compat import cache_keyword, output_cache

    keyword = cache_keyword(model)
    device = next(model.parameters()).device
    ids = torch.tensor(input_ids, dtype=torch.long, device=device)
    out = model(ids[None], use_cache=True, **_last_logits_only(model))
    if after_prefill is not None:
        after_prefill()
    new: list[int] = []
    while True:
        token = out.logits[0, -1].argmax()
        new.append(int(token))
        if len(new) >= max_new_tokens or new[-1] in eos:
            return new
        out = model(token.view(1, 1), use_cache=True, **{keyword: output_cache(out)})


def greedy_generate_batch(model, prompts: Sequence[list[int]], max_new_tokens: int, eos: set[int],
                          pad_id: int) -> list[list[int]]:
    """Greedy tokens after each of ``prompts`` (token-id lists), run as one left-padded batch.

    The batch is ``[len(prompts), longest prompt]`` with ``pad_id`` on the left and a 2-D attention mask; positions
    count from each prompt's first real token (as ``generate`` does), so each row sees what it would alone. A row
    stops after ``max_new_tokens`` tokens or at its first token in ``eos`` (kept); finished rows keep stepping
    (their tokens are dropped) until every row is done. Call under ``torch.inference_mode()``.

    The model must accept left padding: the dense model and the hybrid runtime do, the masked reference does not.
    """
    import torch

    from ...compat import cache_keyword, output_cache

    keyword = cache_keyword(model)
    device = next(model.parameters()).device
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), int(pad_id), dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, longest - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(ids, attention_mask=mask, position_ids=positions, use_cache=True, **_last_logits_only(model))
    new: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    next_position = positions[:, -1:] + 1
    while True:
        tokens = out.logits[:, -1].argmax(-1)
        for i, t in enumerate(tokens.tolist()):
            if not done[i]:
                new[i].append(t)
                done[i] = len(new[i]) >= max_new_tokens or t in eos
        if all(done):
            return new
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
        out = model(tokens[:, None], attention_mask=mask, position_ids=next_position, use_cache=True,
                    **{keyword: output_cache(out)})
        next_position = next_position + 1


def _batches(samples: Sequence[RulerSample], batch_size: int) -> Iterable[list[RulerSample]]:
    """Runs of at most ``batch_size`` consecutive samples of one (task, length): alike in length and answer size."""
    run: list[RulerSample] = []
    for sample in samples:
        if run and (len(run) == batch_size or (run[0].task, run[0].length) != (sample.task, sample.length)):
            yield run
            run = []
        run.append(sample)
    if run:
        yield run


def run_samples(sequence: Callable, samples: Sequence[RulerSample], *, tokenizer, eos_token_id=None,
                on_sample: Callable[[], None] | None = None, batch_size: int = 1) -> dict:
    """Generate greedily for each sample and score it; returns :meth:`RulerResult.to_dict`.

    Args:
        sequence: zero-argument callable returning a context manager that yields ``(model, after_prefill)``,
            one per sequence (or batch); ``after_prefill`` is None or a zero-argument callable, called once right
            after the prefill forward.
        samples: from :func:`build_samples`.
        tokenizer: decodes the new tokens (``decode(ids, skip_special_tokens=True)``).
        eos_token_id: an id or ids that end generation; the tokenizer's ``eos_token_id`` when None.
        on_sample: called with no argument after each sample (a progress tick, as in the passkey eval).
        batch_size: samples generated together (consecutive samples of one task and length, left-padded; see
            :func:`greedy_generate_batch`). 1 runs each sample alone, which every backend supports; more needs a
            model that takes left padding and no ``after_prefill`` step (online selection picks layers per prompt).

    Returns:
        ``{"samples": [outcome per sample, in order], "outcomes": [score per sample, in order], "by_task",
        "by_task_length", "average", "schema_version"}``, scores in percent; ``outcomes`` pairs two rows that
        answered the same samples.
    """
    import torch

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LightTransferError(f"the RULER batch size must be a whole number of at least 1, got {batch_size!r}.")
    eos = _eos_ids(tokenizer, eos_token_id)
    # any real token id pads (the mask hides it): the tokenizer's pad token, else an end-of-sequence id, else 0
    pads = [getattr(tokenizer, "pad_token_id", None), *sorted(eos)]
    pad_id = next((int(t) for t in pads if t is not None and int(t) >= 0), 0)
    outcomes: list[dict] = []
    with torch.inference_mode():
        for batch in _batches(samples, batch_size):
            with sequence() as (model, after_prefill):
                if len(batch) == 1:
                    news = [greedy_generate(model, batch[0].input_ids, batch[0].max_new_tokens, eos, after_prefill)]
                elif after_prefill is not None:
                    raise LightTransferError("a RULER batch cannot run on a row that picks its layers per prompt "
                                             "(online selection); use a batch size of 1.")
                else:
                    news = greedy_generate_batch(model, [s.input_ids for s in batch],
                                                 max(s.max_new_tokens for s in batch), eos, pad_id)
            for sample, new in zip(batch, news, strict=True):
                new = new[:sample.max_new_tokens]
                prediction = tokenizer.decode(new, skip_special_tokens=True)
                outcomes.append({"task": sample.task, "length": sample.length, "index": sample.index,
                                 "depth": sample.depth, "answers": list(sample.answers), "prediction": prediction,
                                 "new_tokens": len(new), "score": score(prediction, sample.answers, sample.metric)})
                if on_sample is not None:
                    on_sample()
    return RulerResult.from_outcomes(outcomes).to_dict()


def task_order(names: Iterable[str]) -> list[str]:
    names = set(names)
    return [t for t in TASKS if t in names] + sorted(names - set(TASKS))


def _over_lengths(result: dict, task: str) -> float | None:
    cells = result.get("by_task_length", {}).get(task)
    if cells:
        return sum(cells.values()) / len(cells)
    return result.get("by_task", {}).get(task)


def markdown_table(results_by_row: dict[str, dict]) -> str:
    """A Markdown table: one row per result, one column per task (mean over lengths), then the average.

    Values are percentages with one decimal; a task a row did not run shows as ``-``.
    """
    tasks = task_order(t for r in results_by_row.values() for t in r.get("by_task", {}))
    lines = ["| row | " + " | ".join(tasks) + " | average |", "|---" * (len(tasks) + 2) + "|"]
    for row, result in results_by_row.items():
        cells, values = [], []
        for t in tasks:
            v = _over_lengths(result, t)
            cells.append("-" if v is None else f"{v:.1f}")
            if v is not None:
                values.append(v)
        avg = f"{sum(values) / len(values):.1f}" if values else "-"
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(lines) + "\n"


def draw_scores(ax, by_task_length: dict, tasks: Sequence[str], lengths: Sequence[str], *,
                task_labels: bool = True, fontsize: int = 7):
    """A task x length grid of scores (0-100) on matplotlib axes ``ax``, each cell labelled; returns the image.

    ``by_task_length``: ``{task: {str(length): score}}``; missing cells stay blank."""
    grid = [[by_task_length.get(t, {}).get(L, float("nan")) for L in lengths] for t in tasks]
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), list(lengths))
    ax.set_yticks(range(len(tasks)), list(tasks) if task_labels else [""] * len(tasks), fontsize=fontsize)
    for i, values in enumerate(grid):
        for j, v in enumerate(values):
            if v == v:  # not NaN
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=fontsize)
    return image


def heatmap(result: dict, path: str | os.PathLike) -> Path:
    """Plot a task x length heat map of ``result`` (scores 0-100) to ``path``, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ...output_files import atomic_path

    cells = result.get("by_task_length", {})
    tasks = task_order(cells)
    lengths = [str(n) for n in sorted({int(n) for t in tasks for n in cells[t]})]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * max(len(lengths), 1), 1.0 + 0.4 * max(len(tasks), 1)))
    image = draw_scores(ax, cells, tasks, lengths, fontsize=8)
    ax.set_xlabel("length (tokens)")
    fig.colorbar(image, ax=ax, label="score (%)")
    fig.tight_layout()
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    try:
        with atomic_path(path, suffix=f".{fmt}") as tmp:
            fig.savefig(tmp, format=fmt)
    finally:
        plt.close(fig)
    return path


__all__ = ["DEFAULT_TASKS", "RulerResult", "TASKS", "build_samples", "check_tasks", "greedy_generate",
           "draw_scores", "greedy_generate_batch", "heatmap", "markdown_table", "run_samples", "sample_seed", "task_order"]
