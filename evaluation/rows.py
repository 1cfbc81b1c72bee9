"""The rows an evaluation compares: which layers stream, with what sink, window and prefill policy.

All rows of one evaluation share the model weights and stream the same number of layers (the same ratio), so
that only the *choice* of layers (lazy, random, least lazy, online) or the policy differs. Every row reports its
KV budget honestly: the KV-cache entries kept at a given length as a fraction of the dense model's, sink and
window included (:meth:`lighttransfer.hybrid_format.HybridLayout.kv_fraction`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..convert.plan import pick_layers, share_of_all_layers
from ..errors import LightTransferError
from ..hybrid_format import HeadRoutingConfig, HybridLayout, SparsePrefillConfig, TokenSelectConfig

# name of each standard row, in table order, and what it is
ROW_KINDS: dict[str, str] = {
    "original": "the dense model (full attention everywhere)",
    "lighttransfer": "the laziest layers stream (this conversion; ranked by the report's own layer score)",
    "lazy-ratio": "the layers with the highest lazy ratio stream (LightTransfer's attention-mass rule), also when "
                  "the report ranks layers by optimized gates",
    "random": "as many random layers stream",
    "least-lazy": "the least lazy layers stream",
    "streamingllm": "every layer streams (StreamingLLM)",
    "prefill-full": "the laziest layers stream after a full-attention prefill",
    "online": "layers chosen per input from the prompt's own lazy ratios, after a full prefill",
    "head-level": "as many KV heads stream as the layer-level row: those whose queries put the least attention "
                  "mass beyond sink + window, model-wide (the report's attention scores, whatever its default)",
    "head-level-gates": "as many KV heads stream as the layer-level row: those with the lowest DuoAttention-style "
                        "gates, model-wide (needs a report with gates, from analyze --method optimize)",
    "random-heads": "as many random KV heads stream, model-wide (the head-level baseline)",
    "least-lazy-heads": "as many KV heads stream, those with the highest long-context score by the report's own "
                        "method (gates or attention mass)",
    "tokenselect": "TokenSelect alone (arXiv 2411.02886): nothing streams; every layer decodes over the keys a soft "
                   "vote of its heads selects (--select-k/--select-init/--select-local/--select-reuse)",
    "lighttransfer+tokenselect": "the lighttransfer row's layers stream and its full layers decode with TokenSelect",
    "quest": "the Quest-like page-bound baseline (arXiv 2406.10774): as tokenselect, candidates scored by pages of 16 "
             "keys through their key min/max bound, the top k/16 pages taken whole",
    "lighttransfer+quest": "the lighttransfer row's layers stream and its full layers decode with the page-bound "
                           "baseline",
    "sparse-prefill": "the dense model with block-sparse prefill in every layer (--sparse-* options: estimator, "
                      "alpha, threshold, blocks)",
    "lighttransfer+sparse-prefill": "the lighttransfer row with block-sparse prefill in its full layers",
    "qada": "nothing streams; at decode each KV head attends sink + window of its full cache when QAdA's Gaussian "
            "prediction says its far share is small (arXiv 2502.09647), tau calibrated for --routing-share",
    "qada-oracle": "as qada, with the exact far share (reads every key: an upper bound for the prediction)",
    "qada-local": "as qada, the Gaussian's moments from the window keys only (routing_stats local)",
    "qada-diag": "as qada, a diagonal key covariance (routing_cov diag)",
    "qada-pages": "as qada, with the pages needle guard: also full when one page of bulk keys could, at its key "
                  "max/min score bound, take more than tau of the attention alone (routing_guard pages)",
    "qada-heads": "as qada, with the heads guard: the quarter of the KV heads with the highest DuoAttention-style "
                  "gates always full, QAdA deciding the rest, tau calibrated for --routing-share over all "
                  "(routing_guard heads; needs a report with gates)",
    "qada-random": "as qada, each (sequence, KV head) routed local at random with probability --routing-share",
    "qada-gates": "as qada, a fixed share --routing-share of the KV heads always local: those with the lowest "
                  "DuoAttention-style gates (static routing; needs a report with gates)",
}
# the head-level rows need per-KV-head scores from an analysis report, so they are asked for by name, like the
# lazy-ratio row, which differs from the lighttransfer row only for a report ranked by gates
HEAD_LEVEL_ROWS = ("head-level", "head-level-gates", "random-heads", "least-lazy-heads")
# TokenSelect rows decode selectively: asked for by name, like the head-level rows
TOKENSELECT_ROWS = ("tokenselect", "lighttransfer+tokenselect", "quest", "lighttransfer+quest")
# rows with block-sparse prefill of the full layers: asked for by name too (they change the prefill, not the cache)
SPARSE_PREFILL_ROWS = ("sparse-prefill", "lighttransfer+sparse-prefill")
# rows that route the full layers' KV heads per decode query, compared at one routed share
ROUTING_ROWS = ("qada", "qada-local", "qada-diag", "qada-pages", "qada-heads", "qada-oracle", "qada-random",
                "qada-gates")
# the routing rows that need KV-head gates from a report
GATED_ROUTING_ROWS = ("qada-heads", "qada-gates")
# the share of the KV heads the qada-heads row keeps always full (those with the highest gates)
GUARD_HEADS_SHARE = 0.25
# rows that stream no layer chosen by a ranking (or all of them): they need no report's lazy ratios
UNRANKED_ROWS = ("original", "streamingllm", "tokenselect", "quest", "sparse-prefill",
                 *(name for name in ROUTING_ROWS if name not in GATED_ROUTING_ROWS))
DEFAULT_ROWS = tuple(name for name in ROW_KINDS
                     if name not in (*HEAD_LEVEL_ROWS, *TOKENSELECT_ROWS, *SPARSE_PREFILL_ROWS, *ROUTING_ROWS,
                                     "lazy-ratio"))


@dataclass(frozen=True)
class EvalRow:
    """One model variant under evaluation: a name, its :class:`~lighttransfer.hybrid_format.HybridLayout` and
    how it was chosen.

    Attributes:
        name: row label (``original``, ``lighttransfer``, ``random``, ...).
        layout: which KV heads of which layers stream, sink, window, prefill policy, online ratio, and the model's
            own sliding layers (bounded in the original too).
        note: how the layers were chosen, for the table.
        sparse_prefill: block-sparse prefill of the full layers (always run by the runtime), or ``None``.
        head_routing: per-query KV-head routing of the full layers' decode (always run by the runtime), or ``None``.
        routing_target: a local share the evaluation calibrates ``head_routing``'s ``tau`` for before the row runs
            (:func:`lighttransfer.runtime.calibrate_head_routing`), or ``None`` (``head_routing`` as given).
    """

    name: str
    layout: HybridLayout
    note: str = ""
    sparse_prefill: SparsePrefillConfig | None = None
    head_routing: HeadRoutingConfig | None = None
    routing_target: float | None = None

    @classmethod
    def of(cls, name: str, *, note: str = "", sparse_prefill: SparsePrefillConfig | None = None,
           head_routing: HeadRoutingConfig | None = None, routing_target: float | None = None,
           **layout: Any) -> EvalRow:
        """``EvalRow.of("random", num_layers=30, num_kv_heads=3, streaming_layers=[...], sink=4, window=1020)``."""
        return cls(name, HybridLayout(**layout), note, sparse_prefill, head_routing, routing_target)

    # the layout's fields, as the backends and the tables read them
    num_layers = property(lambda self: self.layout.num_layers)
    num_kv_heads = property(lambda self: self.layout.num_kv_heads)
    streaming_layers = property(lambda self: list(self.layout.streaming_layers))
    head_masks = property(lambda self: {k: list(v) for k, v in self.layout.head_masks.items()})
    sink = property(lambda self: self.layout.sink)
    window = property(lambda self: self.layout.window)
    prefill = property(lambda self: self.layout.prefill)
    online_ratio = property(lambda self: self.layout.online_ratio)
    selection = property(lambda self: self.layout.selection)
    native_windows = property(lambda self: dict(self.layout.native_windows))
    # a dense layout with sparse prefill still needs the runtime
    is_dense = property(lambda self: self.layout.is_dense and self.sparse_prefill is None
                        and self.head_routing is None)
    needs_runtime = property(lambda self: self.sparse_prefill is not None or self.head_routing is not None)
    num_streaming_layers = property(lambda self: self.layout.num_streaming_layers)

    def kv_fraction(self, seq_len: int) -> float:
        """KV-cache entries kept after ``seq_len`` tokens, as a fraction of the dense model's
        (:meth:`HybridLayout.kv_fraction`: sink + window included, the model's own sliding layers bounded on both
        sides; with a full prefill the peak during the prefill is the dense model's)."""
        return self.layout.kv_fraction(seq_len)

    def to_dict(self) -> dict:
        return {"name": self.name, "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
                "streaming_layers": self.streaming_layers,
                "head_masks": {str(k): v for k, v in sorted(self.head_masks.items())},
                "sink": self.sink, "window": self.window, "prefill": self.prefill, "online_ratio": self.online_ratio,
                "note": self.note, "native_windows": {str(k): v for k, v in sorted(self.native_windows.items())},
                "selection": None if self.selection is None else {"k": self.selection.k, "init": self.selection.init,
                                                                  "local": self.selection.local,
                                                                  "reuse": self.selection.reuse,
                                                                  "reuse_max_age": self.selection.reuse_max_age,
                                                                  "reuse_against": self.selection.reuse_against,
                                                                  **({"score": "pages", "page": self.selection.page}
                                                                     if self.selection.score == "pages" else {})},
                **({"sparse_prefill": self.sparse_prefill.to_dict()} if self.sparse_prefill is not None else {}),
                **({"head_routing": self.head_routing.to_dict()} if self.head_routing is not None else {}),
                **({"routing_target": self.routing_target} if self.routing_target is not None else {})}


def standard_rows(
    *,
    lazy_ratios: Sequence[float],
    ratio: float,
    num_kv_heads: int,
    sink: int,
    window: int,
    names: Sequence[str] = DEFAULT_ROWS,
    lazy_selection: Sequence[int] | None = None,
    kv_head_scores: Sequence[Sequence[float]] | None = None,
    kv_head_gates: Sequence[Sequence[float]] | None = None,
    kv_head_default: Sequence[Sequence[float]] | None = None,
    attention_lazy_ratios: Sequence[float] | None = None,
    ranked_by: str = "lazy ratio",
    seed: int = 0,
    native_windows: dict[int, int] | None = None,
    selection: TokenSelectConfig | None = None,
    sparse_prefill: SparsePrefillConfig | None = None,
    head_routing: HeadRoutingConfig | None = None,
    routing_share: float = 0.5,
    routing_tau: float | None = None,
    routing_page: int | None = None,
) -> list[EvalRow]:
    """Build the rows compared at one ratio.

    Args:
        lazy_ratios: ``[num_layers]`` layer score that ranks layers for streaming (higher = streams first): the
            lazy ratios of the calibration text, or a gate-derived score
            (:meth:`~lighttransfer.analysis.AnalysisReport.layer_streaming_scores`). ``lighttransfer``,
            ``least-lazy`` and ``random`` use it.
        ratio: share of layers that stream, in ``[0, 1]``.
        num_kv_heads: KV heads per layer (for the KV budget).
        sink, window: streaming parameters every streaming row uses.
        names: which rows, from :data:`ROW_KINDS`.
        lazy_selection: the conversion's layers, when they come from a checkpoint (else chosen here).
        kv_head_scores: ``[num_layers][num_kv_heads]`` attention-mass long-context scores (the ``head-level``
            row; :meth:`~lighttransfer.analysis.AnalysisReport.kv_head_long_context_scores` with ``attention``).
        kv_head_gates: ``[num_layers][num_kv_heads]`` optimized gates in [0, 1] (the ``head-level-gates`` row;
            the report's ``kv_head_gates``, DuoAttention arXiv 2410.10819 Sec. 3.2). Both rows stream the
            lowest-scoring heads model-wide, as many as the layer-level rows stream (equal KV budget).
        kv_head_default: ``[num_layers][num_kv_heads]`` the report's own KV-head scores (gates when it has them,
            else attention mass), which ``least-lazy-heads`` ranks from the other end; ``random-heads`` only needs
            its shape.
        attention_lazy_ratios: ``[num_layers]`` lazy ratios for the ``lazy-ratio`` row (default: ``lazy_ratios``).
        ranked_by: what ``lazy_ratios`` is, for the rows' notes.
        seed: seed of the random row.
        native_windows: ``{layer: window}`` of the model's own sliding layers: no row streams them, and, as in
            ``convert``, ``ratio`` is then a share of the other layers.
        selection: TokenSelect's settings for the ``tokenselect`` rows (default: the paper's, 2048/128/512/0.9).
        sparse_prefill: the settings of the sparse-prefill rows (default: :class:`SparsePrefillConfig`'s).
        head_routing: the ``qada`` row's settings (``stats``, ``cov``, ``sink``, ``window``; its ``tau`` is not used).
        routing_share: the local share every routing row is compared at (``qada-random`` draws it, ``qada-gates``
            fixes it, ``qada`` and ``qada-oracle`` calibrate their thresholds for it).
        routing_tau: a fixed threshold for ``qada`` and ``qada-oracle`` (then nothing is calibrated).
        routing_page: keys per page of the ``qada-pages`` row's guard (default: ``head_routing``'s, else 64).
    """
    unknown = [n for n in names if n not in ROW_KINDS]
    if unknown:
        raise LightTransferError(f"--rows: unknown row(s) {unknown}; choose from {', '.join(ROW_KINDS)}.")
    if not 0.0 <= ratio <= 1.0:
        raise LightTransferError(f"--ratio must be between 0 and 1, got {ratio}.")
    n = len(lazy_ratios)
    native = dict(native_windows or {})
    exclude = sorted(native)
    if lazy_selection is not None:
        lazy = sorted(int(i) for i in lazy_selection)
    else:
        share = share_of_all_layers(ratio, num_layers=n, native=exclude)
        lazy = pick_layers(lazy_ratios, ratio=share, exclude=exclude) if share > 0 else []
    k = len(lazy)
    ratio = k / n if n else 0.0  # every other row streams as many layers

    def other(strategy: str) -> list[int]:
        return pick_layers(lazy_ratios, ratio=ratio, strategy=strategy, seed=seed, exclude=exclude) if k else []

    def random_layers() -> tuple[list[int], int]:
        # a random draw that happens to equal the lazy choice would compare nothing; take the next seed then
        for s in range(seed, seed + 100):
            layers = pick_layers(lazy_ratios, ratio=ratio, strategy="random", seed=s, exclude=exclude) if k else []
            if layers != lazy or k in (0, n - len(exclude)):
                return layers, s
        return layers, s

    common = dict(num_layers=n, num_kv_heads=num_kv_heads, sink=sink, window=window, native_windows=native)

    def random_row() -> EvalRow:
        layers, drawn = random_layers()
        return EvalRow.of("random", streaming_layers=layers, **common, note=f"random layers (seed {drawn})")
    by_lazy_ratio = ranked_by == "lazy ratio"
    attention = list(attention_lazy_ratios) if attention_lazy_ratios is not None else list(lazy_ratios)
    if len(attention) != n:
        raise LightTransferError(f"the lazy-ratio row has {len(attention)} lazy ratios for {n} layers.")
    build = {
        "original": lambda: EvalRow.of("original", **dict(common, sink=0, window=1), note="dense"),
        "lighttransfer": lambda: EvalRow.of("lighttransfer", streaming_layers=lazy, **common,
                                         note="laziest layers" if by_lazy_ratio else f"layers ranked by {ranked_by}"),
        "lazy-ratio": lambda: EvalRow.of("lazy-ratio", streaming_layers=pick_layers(attention, ratio=ratio,
                                                                                 exclude=exclude) if k else [],
                                      **common, note="layers with the highest lazy ratio"),
        "random": random_row,
        "least-lazy": lambda: EvalRow.of(
            "least-lazy", streaming_layers=other("least_lazy"), **common,
            note="least lazy layers" if by_lazy_ratio else f"layers ranked last by {ranked_by}"),
        "streamingllm": lambda: EvalRow.of("streamingllm", streaming_layers=[i for i in range(n) if i not in native],
                                        **common, note="all full-attention layers" if native else "all layers"),
        "prefill-full": lambda: EvalRow.of("prefill-full", streaming_layers=lazy, prefill="full", **common,
                                        note="laziest layers, full prefill"),
        "online": lambda: EvalRow.of("online", online_ratio=k / n if n else 0.0, prefill="full", **common,
                                  note="per-input selection after full prefill"),
    }

    def head_level(name: str, scores, what: str, missing: str, strategy: str = "lazy") -> EvalRow:
        from ..convert import select_kv_heads, split_head_masks

        if scores is None:
            raise LightTransferError(f"the {name} row needs {missing}.")
        # the same number of streaming KV heads as the layer-level rows: equal KV budget at every length
        masks = select_kv_heads(scores, ratio=ratio, strategy=strategy, seed=seed, keep_layers=exclude) if k else {}
        layers, partial = split_head_masks(masks)
        count = sum(map(sum, masks.values()))
        how = {"lazy": f"with the lowest {what}", "least_lazy": f"with the highest {what}",
               "random": f"at random (seed {seed})"}[strategy]
        return EvalRow.of(name, streaming_layers=layers, head_masks=partial, **common, note=f"{count} KV heads {how}")

    chosen = selection or TokenSelectConfig()
    build["tokenselect"] = lambda: EvalRow.of("tokenselect", **dict(common, sink=0, window=1), selection=chosen,
                                              note=chosen.describe())
    build["lighttransfer+tokenselect"] = lambda: EvalRow.of(
        "lighttransfer+tokenselect", streaming_layers=lazy, **common, selection=chosen,
        note=("laziest layers" if by_lazy_ratio else f"layers ranked by {ranked_by}") + f"; {chosen.describe()}")
    # the same budget, scored by pages (the default page of 16 clamped to a smaller k)
    by_pages = dataclasses.replace(chosen, score="pages", page=min(chosen.page, chosen.k))
    build["quest"] = lambda: EvalRow.of("quest", **dict(common, sink=0, window=1), selection=by_pages,
                                        note=by_pages.describe())
    build["lighttransfer+quest"] = lambda: EvalRow.of(
        "lighttransfer+quest", streaming_layers=lazy, **common, selection=by_pages,
        note=("laziest layers" if by_lazy_ratio else f"layers ranked by {ranked_by}") + f"; {by_pages.describe()}")
    build["head-level"] = lambda: head_level(
        "head-level", kv_head_scores, "attention mass beyond sink + window",
        "per-KV-head attention scores; pass --report REPORT.json")
    build["head-level-gates"] = lambda: head_level(
        "head-level-gates", kv_head_gates, "optimized gates",
        "KV-head gates; pass --report with gates from 'lighttransfer analyze --method optimize'")
    # a random draw needs only the shape, so this row works without a report
    build["random-heads"] = lambda: head_level(
        "random-heads", kv_head_default or [[0.0] * num_kv_heads for _ in range(n)], "", "", strategy="random")
    build["least-lazy-heads"] = lambda: head_level(
        "least-lazy-heads", kv_head_default, "long-context score", "per-KV-head scores; pass --report REPORT.json",
        strategy="least_lazy")
    sparse = sparse_prefill or SparsePrefillConfig()
    how = f"{sparse.method}, alpha {sparse.alpha}, from {sparse.min_len} keys"
    build["sparse-prefill"] = lambda: EvalRow.of("sparse-prefill", **dict(common, sink=0, window=1),
                                                 sparse_prefill=sparse, note=f"dense cache, sparse prefill ({how})")
    build["lighttransfer+sparse-prefill"] = lambda: dataclasses.replace(
        build["lighttransfer"](), name="lighttransfer+sparse-prefill", sparse_prefill=sparse,
        note=f"laziest layers, sparse prefill of the full layers ({how})")
    qada = dataclasses.replace(head_routing or HeadRoutingConfig(mode="qada", tau=0.0), mode="qada",
                               tau=0.0 if routing_tau is None else float(routing_tau), layer_tau={})
    target = float(routing_share) if routing_tau is None else None
    dense_full = dict(common)  # nothing streams; sink and window are the routed-local heads' defaults

    def routed(name: str, config: HeadRoutingConfig, note: str, calibrate: bool) -> EvalRow:
        return EvalRow.of(name, **dense_full, head_routing=config, routing_target=target if calibrate else None,
                          note=note)

    when = f"tau calibrated for local share {routing_share:g}" if target is not None else f"tau {routing_tau:g}"
    guarded = f", page guard (P={qada.page_size})" if qada.guard == "pages" else ""
    build["qada"] = lambda: routed("qada", dataclasses.replace(qada, mode="qada"),
                                   f"QAdA, {qada.stats} stats, {qada.cov} covariance{guarded}, {when}", True)
    unguarded = dataclasses.replace(qada, guard="none", page=None)
    build["qada-local"] = lambda: routed("qada-local", dataclasses.replace(qada, stats="local"),
                                         f"QAdA, local stats, {qada.cov} covariance, {when}", True)
    build["qada-diag"] = lambda: routed("qada-diag", dataclasses.replace(qada, cov="diag"),
                                        f"QAdA, {qada.stats} stats, diag covariance, {when}", True)
    paged = dataclasses.replace(qada, guard="pages", page=routing_page if routing_page is not None else qada.page)
    build["qada-pages"] = lambda: routed("qada-pages", paged, f"QAdA, {qada.stats} stats, {qada.cov} covariance, "
                                         f"page guard (P={paged.page_size}), {when}", True)
    build["qada-oracle"] = lambda: routed("qada-oracle", dataclasses.replace(unguarded, mode="oracle"),
                                          f"exact far share, {when}", True)
    build["qada-random"] = lambda: routed(
        "qada-random", HeadRoutingConfig(mode="random", share=float(routing_share), seed=seed, sink=qada.sink,
                                         window=qada.window), f"random, share {routing_share:g} (seed {seed})", False)

    def gates_row() -> EvalRow:
        from ..convert import select_kv_heads

        if kv_head_gates is None:
            raise LightTransferError("the qada-gates row needs KV-head gates; pass --report with gates from "
                                     "'lighttransfer analyze --method optimize'.")
        masks = select_kv_heads(kv_head_gates, ratio=float(routing_share), strategy="lazy", seed=seed,
                                keep_layers=exclude) if routing_share > 0 else {}
        count = sum(map(sum, masks.values()))
        config = HeadRoutingConfig(mode="static", local_masks={k: list(v) for k, v in masks.items()}
                                   or {0: [False] * num_kv_heads},
                                   sink=qada.sink, window=qada.window)
        return routed("qada-gates", config, f"{count} KV heads with the lowest gates always local", False)

    build["qada-gates"] = gates_row

    def heads_row() -> EvalRow:
        from ..convert import select_full_kv_heads

        if kv_head_gates is None:
            raise LightTransferError("the qada-heads row needs KV-head gates; pass --report with gates from "
                                     "'lighttransfer analyze --method optimize'.")
        full = select_full_kv_heads(kv_head_gates, share=GUARD_HEADS_SHARE,
                                    layers=[layer for layer in range(n) if layer not in exclude])
        count = sum(map(sum, full.values()))
        config = dataclasses.replace(unguarded, guard="heads", full_masks={k: list(v) for k, v in full.items()})
        return routed("qada-heads", config, f"QAdA, {qada.stats} stats, {qada.cov} covariance, {count} KV heads "
                      f"with the highest gates always full, {when}", True)

    build["qada-heads"] = heads_row
    return [build[name]() for name in names]


__all__ = ["EvalRow", "ROW_KINDS", "DEFAULT_ROWS", "HEAD_LEVEL_ROWS", "TOKENSELECT_ROWS", "SPARSE_PREFILL_ROWS",
           "ROUTING_ROWS", "GATED_ROUTING_ROWS", "UNRANKED_ROWS",
           "standard_rows"]
