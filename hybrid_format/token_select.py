"""The decode policy of the full layers: ``dense`` (every cached key) or ``tokenselect`` (TokenSelect, Wu et al.,
arXiv 2411.02886: per query, the top-``k`` keys by a soft vote of the heads, plus ``init`` first and ``local``
recent tokens; a Selection Cache reuses the previous selection while the queries stay similar).

Plain Python, stored in the checkpoint block and held by :class:`~lighttransfer.hybrid_format.HybridLayout`; the
rule itself is in :mod:`lighttransfer.kernels.token_select`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LightTransferError

DECODE_POLICIES = ("dense", "tokenselect")
# the paper's defaults: 2048 selected tokens, 128 initial, 512 local, reuse at cosine >= 0.9
DEFAULT_SELECT_K = 2048
DEFAULT_SELECT_INIT = 128
DEFAULT_SELECT_LOCAL = 512
DEFAULT_SELECT_REUSE = 0.9
# steps a reused selection may serve after the one that made it (bounds the reused recent block, so a decode step's
# list has the static width init + k + local + max_age; see TokenSelectConfig.reuse_max_age)
DEFAULT_SELECT_REUSE_MAX_AGE = 64
# what a query is compared with for reuse: the query its cached selection was computed from, or the previous one
REUSE_AGAINST = ("anchor", "previous")
DEFAULT_SELECT_REUSE_AGAINST = "anchor"


@dataclass(frozen=True)
class TokenSelectConfig:
    """TokenSelect's settings for the full layers' decode steps.

    Attributes:
        k: candidate tokens selected per query by the soft vote (>= 1).
        init: first real tokens of each sequence always attended (>= 0).
        local: most recent tokens always attended, the query's own included (>= 1, so the new token sees itself).
        reuse: Selection Cache threshold on the cosine similarity between the query and the query it is compared
            with (``reuse_against``), per layer and sequence (``[0, 1]``; ``1.0`` turns the cache off).
        reuse_against: ``anchor`` (the default): the query the cached selection was computed from, so a slow
            drift over many similar steps still ends the reuse; ``previous``: the previous step's query, the
            paper's consecutive-query rule (more hits; the age bound then ends a drifting reuse).
        reuse_max_age: steps a reused selection may serve at most: a query ``a`` keys after the anchor query (the one
            the selection was computed from) reuses it only if ``a <= reuse_max_age``, else it rescores (a miss)
            even when similar (``>= 1``). A reused selection keeps the local window it was made with, extended to
            the current query, so its recent block is ``local + a`` keys wide: the bound makes every decode step's
            list ``init + k + local + reuse_max_age`` slots, a static shape (no host synchronization, CUDA graphs).
            The default 64 costs 64 / 2688 = 2.4 % more list slots at the paper's sizes and amortises the forced
            rescore (the step that reads every candidate key) over at least 65 steps (<= 1.6 % of a miss step each).
        force_reuse: for benchmarks only, never stored in a checkpoint: ``None`` (the default) lets the cosine
            threshold decide; ``True`` counts every query as similar (each step reuses the selection until the age
            bound makes it rescore: a hit at every step but one in ``reuse_max_age + 1``), ``False`` none (every step
            rescores, through the same Selection Cache step). Random weights make the similarity meaningless, so a
            benchmark measures the two ends and interpolates. Needs the Selection Cache (``reuse < 1``).
        score: ``tokens`` (TokenSelect: every candidate key scored exactly, ``q_h · k_t``) or ``pages`` (the
            Quest-like baseline, Tang et al., arXiv 2406.10774: candidates in pages of ``page`` keys, each page
            scored by the upper bound of ``q_h · k`` from its per-dimension key min and max, and the top
            ``k // page`` pages taken whole; the same soft vote over heads, one set per layer and sequence, so that
            the comparison isolates the scoring). ``pages`` is an evaluation baseline: PyTorch only, dynamic decode
            steps only, never stored in a checkpoint.
        page: keys per page for ``score="pages"`` (Quest: 16).
    """

    k: int = DEFAULT_SELECT_K
    init: int = DEFAULT_SELECT_INIT
    local: int = DEFAULT_SELECT_LOCAL
    reuse: float = DEFAULT_SELECT_REUSE
    reuse_max_age: int = DEFAULT_SELECT_REUSE_MAX_AGE
    reuse_against: str = DEFAULT_SELECT_REUSE_AGAINST
    force_reuse: bool | None = None
    score: str = "tokens"
    page: int = 16

    def __post_init__(self) -> None:
        for name, least in (("k", 1), ("init", 0), ("local", 1), ("reuse_max_age", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise LightTransferError(f"select_{name} must be a whole number >= {least}, got {value!r}.")
        reuse = self.reuse
        if isinstance(reuse, bool) or not isinstance(reuse, (int, float)) or not 0.0 <= float(reuse) <= 1.0:
            raise LightTransferError(f"select_reuse must be a cosine threshold in [0, 1] (1 = no Selection "
                                     f"Cache), got {reuse!r}.")
        object.__setattr__(self, "reuse", float(reuse))
        if self.reuse_against not in REUSE_AGAINST:
            raise LightTransferError(f"select_reuse_against must be one of {', '.join(REUSE_AGAINST)}, got "
                                     f"{self.reuse_against!r}.")
        if self.force_reuse is not None and not isinstance(self.force_reuse, bool):
            raise LightTransferError(f"force_reuse must be True, False or None, got {self.force_reuse!r}.")
        if self.force_reuse is not None and not self.cache_enabled:
            raise LightTransferError("force_reuse needs the Selection Cache: select_reuse must be below 1.")
        if self.score not in ("tokens", "pages"):
            raise LightTransferError(f"TokenSelect score must be tokens or pages, got {self.score!r}.")
        if isinstance(self.page, bool) or not isinstance(self.page, int) or self.page < 1 \
                or (self.score == "pages" and self.page > self.k):
            raise LightTransferError(f"the page size of the page-bound selection must be a whole number in "
                                     f"[1, k = {self.k}], got {self.page!r}.")

    @property
    def cache_enabled(self) -> bool:
        return self.reuse < 1.0

    @property
    def budget(self) -> int:
        """Keys attended per query at most: ``init + k + local``."""
        return self.init + self.k + self.local

    @property
    def reuse_width(self) -> int:
        """Slots of a decode step's list with the Selection Cache on: ``init + k + local + reuse_max_age``."""
        return self.budget + self.reuse_max_age

    def describe(self) -> str:
        against = "" if self.reuse_against == "anchor" else " to the previous query"
        cache = f"reuse at cos >= {self.reuse:g}{against} for <= {self.reuse_max_age} steps" if self.cache_enabled \
            else "no Selection Cache"
        if self.force_reuse is not None:
            cache += ", every query forced " + ("similar" if self.force_reuse else "dissimilar")
        if self.score == "pages":
            return (f"Quest-like page bounds, {self.k // self.page} pages of {self.page} (k={self.k}), "
                    f"init={self.init}, local={self.local}, {cache}")
        return f"TokenSelect k={self.k}, init={self.init}, local={self.local}, {cache}"

    def to_fields(self) -> dict:
        """The checkpoint block's flat fields (the names of ``lighttransfer.load``'s keywords; ``force_reuse`` is
        never stored)."""
        if self.score != "tokens":
            raise LightTransferError("the page-bound (Quest-like) selection is an evaluation baseline; it is not "
                                     "stored in a checkpoint.")
        return {"decode": "tokenselect", "select_k": self.k, "select_init": self.init, "select_local": self.local,
                "select_reuse": self.reuse, "select_reuse_max_age": self.reuse_max_age,
                "select_reuse_against": self.reuse_against}


def token_select_config(decode: str | None, *, select_k: int | None = None, select_init: int | None = None,
                        select_local: int | None = None, select_reuse: float | None = None,
                        select_reuse_max_age: int | None = None, select_reuse_against: str | None = None,
                        base: TokenSelectConfig | None = None, option: str = "decode") -> TokenSelectConfig | None:
    """The config the options ask for: ``None`` for ``decode="dense"``; for ``tokenselect``, ``base``'s settings
    (or the defaults) overridden by the ``select_*`` values given. ``decode=None`` keeps ``base``.

    Raises:
        LightTransferError: an unknown policy, ``select_*`` values with a dense decode, or a value out of range.
    """
    given = {k: v for k, v in dict(k=select_k, init=select_init, local=select_local, reuse=select_reuse,
                                   reuse_max_age=select_reuse_max_age,
                                   reuse_against=select_reuse_against).items() if v is not None}
    if decode is None:
        decode = "tokenselect" if base is not None else "dense"
    if decode not in DECODE_POLICIES:
        raise LightTransferError(f"{option} {decode!r} is not known; use one of {', '.join(DECODE_POLICIES)}.")
    if decode == "dense":
        if given:
            raise LightTransferError(f"select_{next(iter(given))} is a TokenSelect setting; pass "
                                     f"{option}='tokenselect' with it, or drop it.")
        return None
    start = base or TokenSelectConfig()
    return TokenSelectConfig(**{**dict(k=start.k, init=start.init, local=start.local, reuse=start.reuse,
                                       reuse_max_age=start.reuse_max_age, reuse_against=start.reuse_against),
                                    **given})


__all__ = ["TokenSelectConfig", "token_select_config", "DECODE_POLICIES", "DEFAULT_SELECT_K", "DEFAULT_SELECT_INIT",
           "DEFAULT_SELECT_LOCAL", "DEFAULT_SELECT_REUSE", "DEFAULT_SELECT_REUSE_MAX_AGE", "DEFAULT_SELECT_REUSE_AGAINST",
           "REUSE_AGAINST"]
