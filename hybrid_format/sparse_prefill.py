"""Sparse prefill of the full layers, as stored in the checkpoint block (``"sparse_prefill": {...}``).

A full layer's prefill attention can run block-sparse (:mod:`lighttransfer.kernels.sparse_prefill`): an estimator
scores key blocks per (head, query block) and the blocks are kept until a share ``alpha`` of the estimated
attention mass, plus the sink and the local band. Below ``min_len`` keys the layer stays dense. The block is
optional and versioned on its own (``schema_version``), so blocks without it load as before::

    "sparse_prefill": {"schema_version": 1, "method": "sample", "alpha": 0.95, "min_len": 16384,
                       "block_q": 128, "block_k": 64, "sink_blocks": 1, "local_blocks": 2, "options": {},
                       "gqa_lists": "query"}

``gqa_lists`` (optional, default ``"query"``: blocks written before it load unchanged) chooses one list per query
head, or one per KV head (``"kv-union"`` / ``"kv-sum"``, :mod:`lighttransfer.kernels.block_select`), which lets the
kernel pack a KV head's query heads into one tile of ``GROUP * block_q`` rows: with lists per KV head, ``block_q`` is
the queries of one head in a block (e.g. 32 for a group of 4 keeps the 128-row tile).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import LightTransferError

SPARSE_PREFILL_SCHEMA_VERSION = 1
SPARSE_METHODS = ("sample", "vslash", "antidiag")
GQA_LISTS = ("query", "kv-union", "kv-sum")  # the same names as kernels.block_select.GQA_LISTS
# options each method takes (see kernels/sparse_estimators.py)
METHOD_OPTIONS = {"sample": {"share"}, "vslash": {"last_q"}, "antidiag": {"stride", "reduce"}}


@dataclass(frozen=True)
class SparsePrefillConfig:
    """How the full layers prefill block-sparse.

    Attributes:
        method: estimator: ``sample`` (sampled query rows), ``vslash`` (last-queries vertical-slash) or
            ``antidiag`` (antidiagonal scoring).
        alpha: share of the estimated attention mass each (head, query block) keeps, in ``(0, 1]``.
        min_len: keys below which a prefill (or chunk) stays dense, >= 1.
        block_q, block_k: query rows and keys per block (powers of two >= 16).
        sink_blocks: first key blocks always kept (>= 0).
        local_blocks: key blocks ending at the diagonal always kept (>= 1).
        options: the estimator's own options (``share``, ``last_q`` or ``stride``).
        gqa_lists: ``query`` (a list per query head), ``kv-union`` or ``kv-sum`` (a list per KV head: the union of
            its query heads' selections, or one selection on their summed mass; the kernel then packs the group).
    """

    method: str = "sample"
    alpha: float = 0.95
    min_len: int = 16384
    block_q: int = 128
    block_k: int = 64
    sink_blocks: int = 1
    local_blocks: int = 2
    options: dict[str, Any] = field(default_factory=dict)
    gqa_lists: str = "query"
    schema_version: int = SPARSE_PREFILL_SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != SPARSE_PREFILL_SCHEMA_VERSION:
            raise LightTransferError(f"sparse_prefill schema_version {self.schema_version} is not supported (this "
                                     f"lighttransfer reads {SPARSE_PREFILL_SCHEMA_VERSION}); upgrade lighttransfer.")
        if self.method not in SPARSE_METHODS:
            raise LightTransferError(f"prefill_sparse method {self.method!r} is not known; use one of "
                                     f"{', '.join(SPARSE_METHODS)} (or None for dense).")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha <= 1:
            raise LightTransferError(f"prefill_alpha must be in (0, 1], got {self.alpha!r}.")
        for name, low in (("min_len", 1), ("block_q", 16), ("block_k", 16), ("sink_blocks", 0),
                          ("local_blocks", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise LightTransferError(f"sparse prefill {name} must be a whole number >= {low}, got {value!r}.")
        for name in ("block_q", "block_k"):
            if getattr(self, name) & (getattr(self, name) - 1):
                raise LightTransferError(f"sparse prefill {name} must be a power of two, got {getattr(self, name)}.")
        if self.gqa_lists not in GQA_LISTS:
            raise LightTransferError(f"sparse prefill gqa_lists must be one of {', '.join(GQA_LISTS)}, got "
                                     f"{self.gqa_lists!r}.")
        unknown = set(self.options) - METHOD_OPTIONS[self.method]
        if unknown:
            raise LightTransferError(f"sparse prefill options {sorted(unknown)} do not apply to method "
                                     f"{self.method!r} (it takes {sorted(METHOD_OPTIONS[self.method])}).")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["gqa_lists"] == "query":
            del d["gqa_lists"]  # the default: such blocks stay readable by versions that predate the field
        return dict(sorted(d.items()))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SparsePrefillConfig:
        if not isinstance(d, dict):
            raise LightTransferError("sparse_prefill must be an object.")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise LightTransferError(f"unknown keys in sparse_prefill: {sorted(unknown)}.")
        return cls(**d)


def sparse_prefill_config(method: str | None, *, alpha: float | None = None, min_len: int | None = None,
                          option: str = "prefill_sparse") -> SparsePrefillConfig | None:
    """The entry the options ask for: ``None`` for ``method`` ``None``/``"dense"``, else the method's defaults with
    ``alpha``/``min_len`` over them. ``alpha``/``min_len`` without a method are an error (they would do nothing)."""
    if method in (None, "dense"):
        if alpha is not None or min_len is not None:
            raise LightTransferError(f"prefill alpha / min-len need {option} sample, vslash or antidiag; pass one, "
                                     "or drop them.")
        return None
    given = {k: v for k, v in dict(alpha=alpha, min_len=min_len).items() if v is not None}
    return SparsePrefillConfig(method=method, **given)


__all__ = ["SparsePrefillConfig", "sparse_prefill_config", "GQA_LISTS", "SPARSE_METHODS", "SPARSE_PREFILL_SCHEMA_VERSION", "METHOD_OPTIONS"]
