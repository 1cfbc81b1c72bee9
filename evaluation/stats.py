"""Confidence intervals for retrieval accuracies: how far a measured difference can be trusted.

Passkey accuracy is a share of ``n`` pass/fail prompts, so a 5-point gap means little at ``n = 40`` and more at
``n = 200``. Every row of an evaluation answers the same prompts, so two rows are compared per prompt (paired),
which is tighter than comparing two independent shares.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959964  # two-sided 95% normal quantile


def wilson_interval(hits: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial share ``hits / n`` (Wilson 1927), as ``(low, high)`` in [0, 1].

    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0 or ``n`` hits.
    ``n = 0`` gives ``(0.0, 1.0)``: nothing is known.
    """
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= hits <= n:
        raise ValueError(f"hits must be between 0 and n={n}, got {hits}.")
    p = hits / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / denom
    # at 0 or n hits one end is exactly 0 or 1; rounding must not move it inside
    low = 0.0 if hits == 0 else max(0.0, centre - half)
    high = 1.0 if hits == n else min(1.0, centre + half)
    return low, high


def paired_difference(a: Sequence[float], b: Sequence[float], z: float = Z95) -> tuple[float, float, float]:
    """Mean per-prompt difference ``a - b`` of two rows answering the same prompts, with a normal-approximation
    interval: ``(difference, low, high)`` in shares (multiply by 100 for points).

    Outcomes are pass/fail (bools) or partial scores in [0, 1] (RULER's string_match_all). Each prompt
    contributes ``a_i - b_i`` in [-1, 1]; prompts both rows score alike add nothing to the spread, which is why the
    paired interval is tighter than two separate ones.
    """
    if len(a) != len(b):
        raise ValueError(f"paired rows must answer the same prompts, got {len(a)} and {len(b)} outcomes.")
    n = len(a)
    if n == 0:
        return 0.0, -1.0, 1.0
    d = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    half = z * math.sqrt(var / n)
    return mean, max(-1.0, mean - half), min(1.0, mean + half)


__all__ = ["Z95", "paired_difference", "wilson_interval"]
