"""How an evaluation row becomes a model to run: two backends over one loaded dense model.

* ``masked``: :func:`~lighttransfer.evaluation.masked_reference.masked_streaming` (full KV, streaming layers masked).
  Exact in its logits, dense in memory; independent of the runtime, so it checks it.
* ``runtime``: the hybrid runtime switched on in place (:func:`lighttransfer.runtime.enable_hybrid`), whose
  streaming layers keep a bounded sink + window cache: what users run.

Rows with block-sparse prefill or head routing run through the runtime under either backend (a mask cannot express
them).

Both give a context manager per sequence that yields ``(model, after_prefill)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Literal

from .masked_reference import masked_streaming
from .rows import EvalRow

BackendName = Literal["masked", "runtime"]
# queries at the end of the prompt whose attention picks the layers in online mode (the runtime's default)
ONLINE_LAST = 32


class MaskedBackend:
    """Every row on one dense model, by masking."""

    name = "masked"

    def __init__(self, model, *, online_last: int = ONLINE_LAST) -> None:
        from ..runtime.token_select import SelectionStats

        self.model = model
        self.online_last = online_last
        self.stats = SelectionStats()
        self._runtime = RuntimeBackend(model)  # rows with sparse prefill: the mask cannot express it

    @contextlib.contextmanager
    def sequence(self, row: EvalRow) -> Iterator[tuple[object, Callable[[], None] | None]]:
        if row.needs_runtime:
            with self._runtime.sequence(row) as pair:
                yield pair
            return
        if row.is_dense:
            yield self.model, None
            return
        layout = dataclasses.replace(row.layout, online_last=self.online_last)
        with masked_streaming(self.model, layout, selection_stats=self.stats) as plan:
            yield self.model, plan.finish_online_selection

    def selection_stats(self) -> dict:
        """TokenSelect's Selection Cache counts since the last :meth:`release`."""
        return self.stats.to_dict()

    def release(self, row: EvalRow) -> None:
        """Nothing to undo (the mask lives only inside each sequence; sparse-prefill rows: the runtime's); the
        counts start again."""
        self.stats.reset()
        if row.needs_runtime:
            self._runtime.release(row)

    def routing_stats(self) -> dict:
        """Head routing's realised shares of the row switched on (routing rows run by the runtime)."""
        return self._runtime.routing_stats()


class RuntimeBackend:
    """Each row run by the hybrid runtime, switched on in place on the one loaded model."""

    name = "runtime"

    def __init__(self, model) -> None:
        self.model = model
        self._active: str | None = None

    def _enable(self, row: EvalRow) -> None:
        from ..runtime import disable_hybrid, enable_hybrid, runtime_of

        if self._active == row.name:
            return
        disable_hybrid(self.model)
        self._active = row.name
        if row.is_dense:
            return
        enable_hybrid(self.model, row.layout, sparse_prefill=row.sparse_prefill, head_routing=row.head_routing)
        # teacher-forced continuations select (route) per query, exactly as greedy decoding would
        runtime_of(self.model).select_chunks = row.selection is not None or row.head_routing is not None

    @contextlib.contextmanager
    def sequence(self, row: EvalRow) -> Iterator[tuple[object, Callable[[], None] | None]]:
        self._enable(row)
        yield self.model, None

    def selection_stats(self) -> dict:
        """TokenSelect's Selection Cache counts of the row switched on (empty counts for a dense row)."""
        from ..runtime.hybrid import RUNTIME_ATTR
        from ..runtime.token_select import SelectionStats

        runtime = getattr(self.model, RUNTIME_ATTR, None)
        return (runtime.selection_stats if runtime is not None else SelectionStats()).to_dict()

    def routing_stats(self) -> dict:
        """Head routing's realised shares (``local_share``, ``decisions``, ``by_layer``) of the row switched on."""
        from ..runtime.hybrid import RUNTIME_ATTR

        runtime = getattr(self.model, RUNTIME_ATTR, None)
        routing = runtime.head_routing if runtime is not None else None
        return routing.stats.to_dict() if routing is not None else {}

    def release(self, row: EvalRow) -> None:
        from ..runtime import disable_hybrid

        disable_hybrid(self.model)
        self._active = None


__all__ = ["MaskedBackend", "RuntimeBackend", "BackendName", "ONLINE_LAST"]
