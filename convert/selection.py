"""Which layers (or KV heads) of a model switch to streaming attention: pure functions over analysis scores.

LightTransfer (arXiv 2410.13846, Sec. 3) ranks layers by their *lazy ratio*: the share of a query's attention
mass that falls on exactly the keys a streaming cache keeps (the ``sink`` first tokens and the ``window`` most
recent ones). The layers with the highest lazy ratio lose least when their other keys are dropped, so
``round(ratio * L)`` of them stream. The head-level variant does the same over all ``L * H_kv`` KV heads,
streaming those with the *lowest* long-context score.

Besides the paper's ``lazy`` rule, two baselines are offered for evaluation: ``random`` (seeded) and
``least_lazy`` (the opposite ranking, which should hurt most).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from ..errors import LightTransferError

Strategy = Literal["lazy", "random", "least_lazy"]
STRATEGIES: tuple[str, ...] = ("lazy", "random", "least_lazy")


def streaming_count(ratio: float, total: int) -> int:
    """``round(ratio * total)`` with halves rounded up (Python's ``round`` would round 2.5 to 2)."""
    check_ratio(ratio)
    return min(total, int(math.floor(ratio * total + 0.5)))


def check_ratio(ratio: float) -> None:
    """Raise a one-line error unless ``0 < ratio <= 1``."""
    if not isinstance(ratio, (int, float)) or math.isnan(ratio) or not 0.0 < ratio <= 1.0:
        raise LightTransferError(
            f"--ratio {ratio} is out of range; pass the share of layers to stream, in (0, 1] (e.g. 0.5)."
        )


def check_layer_indices(indices: Iterable[int], num_layers: int, *, option: str) -> list[int]:
    """Validate user-given layer indices (``0 .. num_layers-1``, no duplicates) and return them sorted."""
    indices = [int(i) for i in indices]
    bad = sorted({i for i in indices if not 0 <= i < num_layers})
    if bad:
        raise LightTransferError(
            f"{option} {','.join(map(str, bad))}: no such layer; the model has {num_layers} layers "
            f"(0..{num_layers - 1})."
        )
    dupes = sorted({i for i in indices if indices.count(i) > 1})
    if dupes:
        raise LightTransferError(f"{option} lists layer(s) {','.join(map(str, dupes))} more than once.")
    return sorted(indices)


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise LightTransferError(f"strategy '{strategy}' is not known; use one of {', '.join(STRATEGIES)}.")


def _order(candidates: list, score, strategy: str, seed: int) -> list:
    """Candidates in the order they are picked: most streamable first, ties broken by lower index."""
    if strategy == "random":
        picked = list(candidates)
        random.Random(seed).shuffle(picked)
        return picked
    sign = -1.0 if strategy == "lazy" else 1.0

    def key(c):
        x = score(c)
        # a candidate without a score (NaN) comes last under either ranking
        return (0, sign * x, c) if math.isfinite(x) else (1, 0.0, c)

    return sorted(candidates, key=key)


def select_layers(
    lazy_ratios: Sequence[float],
    *,
    ratio: float,
    keep: Iterable[int] = (),
    layers: Iterable[int] | None = None,
    strategy: Strategy = "lazy",
    seed: int = 0,
) -> list[int]:
    """Pick the layers that stream.

    Args:
        lazy_ratios: ``[num_layers]`` floats in [0, 1], the analysis' per-layer lazy ratio (higher = lazier).
        ratio: share of all layers to stream, in (0, 1]; ``round(ratio * num_layers)`` layers are picked.
        keep: layers that always stay full attention (never picked).
        layers: the streaming layers given by hand; overrides the ranking (still validated against ``keep``).
        strategy: ``lazy`` (highest lazy ratio first, the paper's rule), ``least_lazy`` (lowest first) or
            ``random`` (uniform, seeded by ``seed``). Ties go to the lower layer index.
        seed: random seed for ``strategy="random"``.

    Returns:
        Sorted layer indices.
    """
    num_layers = len(lazy_ratios)
    check_ratio(ratio)
    check_strategy(strategy)
    keep = check_layer_indices(keep, num_layers, option="--keep")
    if layers is not None:
        chosen = check_layer_indices(layers, num_layers, option="--layers")
        clash = sorted(set(chosen) & set(keep))
        if clash:
            raise LightTransferError(
                f"layer(s) {','.join(map(str, clash))} are both in --layers and --keep; drop them from one."
            )
        return chosen
    candidates = [i for i in range(num_layers) if i not in keep]
    count = min(streaming_count(ratio, num_layers), len(candidates))
    ordered = _order(candidates, lambda i: float(lazy_ratios[i]), strategy, seed)
    return sorted(ordered[:count])


def select_kv_heads(
    scores: Sequence[Sequence[float]],
    *,
    ratio: float,
    keep_layers: Iterable[int] = (),
    strategy: Strategy = "lazy",
    seed: int = 0,
) -> dict[int, list[bool]]:
    """Pick the KV heads that stream, model-wide.

    Args:
        scores: ``[num_layers][num_kv_heads]`` long-context scores (higher = the head needs distant keys more).
        ratio: share of all ``num_layers * num_kv_heads`` KV heads to stream, in (0, 1].
        keep_layers: layers whose heads all stay full attention.
        strategy: ``lazy`` streams the lowest scores, ``least_lazy`` the highest, ``random`` a seeded sample;
            ties go to the lower ``(layer, head)``.

    Returns:
        ``{layer: [bool] * num_kv_heads}`` (True = that KV head streams) for every layer with at least one
        streaming head. Use :func:`split_head_masks` to turn it into ``streaming_layers`` + ``head_masks``.
    """
    check_ratio(ratio)
    check_strategy(strategy)
    num_layers = len(scores)
    widths = {len(row) for row in scores}
    if len(widths) > 1:
        raise LightTransferError(f"per-head scores have rows of different lengths {sorted(widths)}; the report is corrupt.")
    num_kv_heads = widths.pop() if widths else 0
    keep = set(check_layer_indices(keep_layers, num_layers, option="--keep"))
    candidates = [(layer, head) for layer in range(num_layers) if layer not in keep for head in range(num_kv_heads)]
    count = min(streaming_count(ratio, num_layers * num_kv_heads), len(candidates))
    # "lazy" for heads means the lowest long-context score, so the ranking sign flips relative to layers
    flipped = {"lazy": "least_lazy", "least_lazy": "lazy", "random": "random"}[strategy]
    ordered = _order(candidates, lambda c: float(scores[c[0]][c[1]]), flipped, seed)
    masks: dict[int, list[bool]] = {}
    for layer, head in ordered[:count]:
        masks.setdefault(layer, [False] * num_kv_heads)[head] = True
    return dict(sorted(masks.items()))


def select_full_kv_heads(scores: Sequence[Sequence[float]], *, share: float,
                        layers: Iterable[int]) -> dict[int, list[bool]]:
    """The KV heads head routing's ``heads`` guard keeps always full: of the KV heads of ``layers`` (the full
    layers), the share ``share`` in (0, 1] (at least one) with the highest long-context scores
    (``[num_layers][num_kv_heads]``), ranked and rounded as :func:`select_kv_heads` ranks and rounds.

    Returns:
        ``{layer: [bool] * num_kv_heads}`` (True = always full) for every layer with at least one such head.
    """
    num_kv_heads = len(scores[0]) if len(scores) else 0
    candidates = [(layer, head) for layer in sorted(set(layers)) for head in range(num_kv_heads)]
    count = max(1, streaming_count(share, len(candidates))) if candidates else 0
    masks: dict[int, list[bool]] = {}
    for layer, head in _order(candidates, lambda c: float(scores[c[0]][c[1]]), "lazy", 0)[:count]:
        masks.setdefault(layer, [False] * num_kv_heads)[head] = True
    return dict(sorted(masks.items()))


def split_head_masks(masks: dict[int, list[bool]]) -> tuple[list[int], dict[int, list[bool]]]:
    """Split per-layer head masks into fully streaming layers and partially streaming ones.

    Returns:
        ``(streaming_layers, head_masks)``: layers whose every KV head streams, and the rest (with at least one
        streaming head), as :class:`~lighttransfer.hybrid_format.config_block.HybridConfig` stores them.
    """
    full = sorted(layer for layer, mask in masks.items() if mask and all(mask))
    partial = {layer: list(mask) for layer, mask in sorted(masks.items()) if any(mask) and not all(mask)}
    return full, partial


@dataclass(frozen=True)
class SelectionRow:
    """One line of the table that says what was chosen and why.

    Attributes:
        layer: layer index.
        lazy_ratio: the analysis' lazy ratio of the layer, or ``None`` without a report.
        rank: 1 = the layer that streams first by the score the selection used, or ``None`` without a report.
        kind: ``streaming``, ``mixed`` (some KV heads stream) or ``full``.
        streaming_heads: how many KV heads of the layer stream.
        reason: why, in a few words.
    """

    layer: int
    lazy_ratio: float | None
    rank: int | None
    kind: str
    streaming_heads: int
    reason: str
    score: float | None = None
    score_label: str | None = None

    def to_dict(self) -> dict:
        out = {"layer": self.layer, "lazy_ratio": self.lazy_ratio, "rank": self.rank, "kind": self.kind,
               "streaming_heads": self.streaming_heads, "reason": self.reason}
        if self.score_label is not None:
            out.update(score=self.score, score_label=self.score_label)
        return out


def explain_selection(
    *,
    num_layers: int,
    num_kv_heads: int,
    streaming_layers: Sequence[int],
    head_masks: dict[int, list[bool]] | None = None,
    lazy_ratios: Sequence[float] | None = None,
    keep: Iterable[int] = (),
    manual: bool = False,
    strategy: str = "lazy",
    scores: Sequence[float] | None = None,
    score_label: str | None = None,
    native: Iterable[int] = (),
) -> list[SelectionRow]:
    """One :class:`SelectionRow` per layer, in layer order.

    ``scores`` (with ``score_label``, e.g. ``1 - max gate``) is the per-layer score that ranked the layers when it
    is not the lazy ratio; ranks and reasons then follow it. ``native``: layers that slide the model's own window
    (left as they are).
    """
    head_masks = head_masks or {}
    keep = set(keep)
    native = set(native)
    streaming = set(streaming_layers)
    ranking = scores if scores is not None else lazy_ratios
    ranks: dict[int, int] = {}
    if ranking is not None:
        order = sorted(range(num_layers), key=lambda i: (-_finite_low(ranking[i]), i))
        ranks = {layer: r + 1 for r, layer in enumerate(order)}
    picked_by = {"lazy": "among the laziest", "least_lazy": "among the least lazy", "random": "drawn at random"}
    if scores is not None:
        picked_by.update(lazy="lowest gates", least_lazy="highest gates")
    rows = []
    for layer in range(num_layers):
        mask = [True] * num_kv_heads if layer in streaming else head_masks.get(layer, [False] * num_kv_heads)
        n = sum(mask)
        kind = "streaming" if n == num_kv_heads and n else "mixed" if n else "full"
        if layer in native:
            reason = "the model's own sliding window"
        elif layer in keep:
            reason = "kept full (--keep)"
        elif manual:
            reason = "chosen by hand (--layers)" if n else "not in --layers"
        elif kind == "full":
            reason = "above the cutoff" if strategy == "least_lazy" else "below the cutoff"
            if strategy == "random":
                reason = "not drawn"
        elif kind == "mixed":
            reason = f"{n}/{num_kv_heads} KV heads {picked_by.get(strategy, '')}".rstrip()
        else:
            reason = picked_by.get(strategy, "selected")
        ratio = None if lazy_ratios is None else float(lazy_ratios[layer])
        rows.append(SelectionRow(layer, ratio, ranks.get(layer), kind, n, reason,
                                 score=None if scores is None else float(scores[layer]),
                                 score_label=score_label if scores is not None else None))
    return rows


def _finite_low(x: float) -> float:
    return x if math.isfinite(x) else -math.inf


def tied_at_cut(scores: Sequence[float], chosen: Iterable[int]) -> int:
    """How many chosen candidates share their score with an unchosen one, so that only the index tie-break put
    them on the streaming side of the cut.

    Args:
        scores: one score per candidate (flattened ``[layers]`` or ``[layers * kv_heads]``); NaN counts as no tie.
        chosen: indices into ``scores`` that were picked to stream.

    Returns:
        The number of chosen candidates whose exact score also belongs to an unchosen candidate. 0 means the
        ranking alone decided the cut.
    """
    chosen = set(chosen)
    unchosen_scores = {float(x) for i, x in enumerate(scores) if i not in chosen and math.isfinite(float(x))}
    return sum(1 for i in chosen if float(scores[i]) in unchosen_scores)


__all__ = [
    "STRATEGIES",
    "Strategy",
    "SelectionRow",
    "check_ratio",
    "check_layer_indices",
    "streaming_count",
    "select_layers",
    "select_kv_heads",
    "split_head_masks",
    "explain_selection",
    "tied_at_cut",
]
