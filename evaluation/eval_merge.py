"""Join evaluation results whose rows ran apart (other processes, other GPUs) into one result.

Rows of one evaluation are independent: each row sees the same model, samples and lengths, so an evaluation
split by ``--rows`` over several processes measures the same thing as one run. :func:`merge_results` checks that
the parts agree on everything but their rows (model fingerprint, lengths, passkey grid, RULER tasks and samples,
seed-fixed sample sets, backend, window, ...) and concatenates the rows in the order given; the paired columns
("vs original") are then computed over the merged rows as for a single run. ``environment`` must agree except for
free-form host details, and each part's own environment is kept under ``environment["parts"]``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import fields, replace

from ..errors import LightTransferError
from .eval_suite import EvalResult

# what each part may differ in: its rows, where and when it ran
_PER_PART = {"rows", "environment"}
# environment keys that must agree (the measurement depends on them); the rest (hostnames, ...) may differ
_ENVIRONMENT_KEYS = ("device", "torch", "transformers", "lighttransfer")


def merge_results(parts: Sequence[EvalResult], *, names: Sequence[str] | None = None) -> EvalResult:
    """One :class:`EvalResult` with the rows of every part, in order.

    Args:
        parts: results of one evaluation split by rows (at least one).
        names: a label per part for error messages (e.g. file names); default ``part 1``, ``part 2``, ...

    Raises:
        LightTransferError: one line naming the part and the first field on which it differs from the first part,
            or a row name that two parts both ran.
    """
    if not parts:
        raise LightTransferError("nothing to merge: give at least one evaluation result.")
    names = list(names) if names is not None else [f"part {i + 1}" for i in range(len(parts))]
    if len(names) != len(parts):
        raise LightTransferError(f"{len(names)} names for {len(parts)} results to merge; give one name per result.")
    first = parts[0]
    for name, part in zip(names[1:], parts[1:], strict=True):
        for f in fields(EvalResult):
            if f.name not in _PER_PART and getattr(part, f.name) != getattr(first, f.name):
                raise LightTransferError(f"{name} differs from {names[0]} in '{f.name}' ({getattr(part, f.name)!r} vs "
                                         f"{getattr(first, f.name)!r}); only results of one evaluation split by "
                                         "--rows can be merged.")
        for key in _ENVIRONMENT_KEYS:
            if part.environment.get(key) != first.environment.get(key):
                raise LightTransferError(f"{name} ran with {key} {part.environment.get(key)!r} but {names[0]} with "
                                         f"{first.environment.get(key)!r}; merge only results of one setup.")
    seen: dict[str, str] = {}
    rows = []
    for name, part in zip(names, parts, strict=True):
        for row in part.rows:
            if row["name"] in seen:
                raise LightTransferError(f"row '{row['name']}' is in both {seen[row['name']]} and {name}; "
                                         "each row must come from one part.")
            seen[row["name"]] = name
            rows.append(row)
    environment = dict(first.environment)
    environment["parts"] = [dict(p.environment, rows=[r["name"] for r in p.rows]) for p in parts]
    return replace(first, rows=rows, environment=environment)


def merge_files(paths: Sequence[str | os.PathLike[str]]) -> EvalResult:
    """:func:`merge_results` of the result JSON files ``paths`` (error messages name the files)."""
    return merge_results([EvalResult.load(p) for p in paths], names=[f"'{p}'" for p in paths])


__all__ = ["merge_results", "merge_files"]
