"""RULER's metrics and their aggregation.

* ``string_match_all(pred, refs)``: the fraction of references found (case-insensitive substring) in the
  prediction -- every needle value, variable name or word must be recalled for full marks.
* ``string_match_part(pred, refs)``: 1.0 if any reference is found, else 0.0 -- for questions with several
  acceptable answers.

Both return a fraction in [0, 1]; :func:`score` returns the sample score in percent (x100), the unit in which
every aggregate below is reported. Aggregates are plain means of sample scores: per task, per (task, length),
and the average over tasks (each task weighs the same, whatever its sample count).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

METRICS = ("all", "part")


def string_match_all(pred: str, refs: Sequence[str]) -> float:
    """Fraction of ``refs`` contained in ``pred``, ignoring case (1.0 for no refs)."""
    if not refs:
        return 1.0
    low = pred.lower()
    return sum(ref.lower() in low for ref in refs) / len(refs)


def string_match_part(pred: str, refs: Sequence[str]) -> float:
    """1.0 if any of ``refs`` is contained in ``pred`` (ignoring case), else 0.0."""
    low = pred.lower()
    return 1.0 if any(ref.lower() in low for ref in refs) else 0.0


def score(pred: str, refs: Sequence[str], metric: str) -> float:
    """The sample score in percent (0-100) under ``metric`` (``"all"`` or ``"part"``)."""
    if metric == "all":
        return 100.0 * string_match_all(pred, refs)
    if metric == "part":
        return 100.0 * string_match_part(pred, refs)
    raise ValueError(f"unknown RULER metric {metric!r}; expected one of {METRICS}")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def aggregate(outcomes: Iterable[tuple[str, int, float]]) -> dict:
    """Means of ``(task, length, score)`` triples: ``{"by_task", "by_task_length", "average"}``.

    ``by_task_length`` is ``{task: {str(length): score}}`` (JSON keys are strings); ``average`` is the mean
    of the per-task means (0.0 when there is nothing to average). Keys are sorted.
    """
    per_task: dict[str, list[float]] = {}
    per_cell: dict[str, dict[int, list[float]]] = {}
    for task, length, value in outcomes:
        per_task.setdefault(task, []).append(value)
        per_cell.setdefault(task, {}).setdefault(int(length), []).append(value)
    by_task = {t: _mean(per_task[t]) for t in sorted(per_task)}
    by_task_length = {t: {str(n): _mean(per_cell[t][n]) for n in sorted(per_cell[t])}
                      for t in sorted(per_cell)}
    return {"by_task": by_task, "by_task_length": by_task_length, "average": _mean(list(by_task.values()))}


__all__ = ["METRICS", "aggregate", "score", "string_match_all", "string_match_part"]
