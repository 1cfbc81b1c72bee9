"""The streaming layers' KV cache in vLLM: a sink + window spec and the manager that keeps it bounded.

:class:`SinkWindowSpec` is vLLM's ``SlidingWindowSpec`` plus ``sink``; it is a KV spec type of its own, so the
streaming layers form their own KV cache group(s), apart from the full layers. :class:`SinkWindowManager`
(vLLM's ``SlidingWindowManager``, changed in what it frees) keeps a request's first ``ceil(sink /
block_size)`` blocks for the whole request and frees every block that lies entirely between them and the
window: after ``n`` computed tokens the next query, at position ``n``, needs keys ``< sink`` and
``>= n - window + 1`` (the rule of :func:`~lighttransfer.kernels.mask.streaming_visible`). A request therefore
holds at most ``ceil(sink / block_size) + ceil((window - 1 + tokens in flight) / block_size) + 1`` blocks of
this group, whatever its length; :meth:`SinkWindowSpec.max_admission_blocks_per_request` says so to the
scheduler and to the KV-capacity report.

Prefix caching: a cache hit for these layers would have to include the sink blocks, which vLLM's
sliding-window hit search does not look for, so :meth:`SinkWindowManager.find_longest_cache_hit` reports no
hit (in a hybrid model the hit is the minimum over groups: prefix caching is off for hybrids).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .internals import (
    KVCacheSpecRegistry,
    SlidingWindowManager,
    SlidingWindowSpec,
    cdiv,
    ensure_builtin_kv_specs,
)


@dataclass(frozen=True, kw_only=True)
class SinkWindowSpec(SlidingWindowSpec):
    """vLLM's sliding-window spec with ``sink`` first tokens kept besides the ``sliding_window`` recent ones."""

    sink: int = 0

    @classmethod
    def from_sliding(cls, spec: SlidingWindowSpec, *, sink: int) -> SinkWindowSpec:
        """The same spec (block size, heads, dtype, window, ...) with ``sink`` added."""
        values = {f.name: getattr(spec, f.name) for f in fields(spec) if f.init}
        return cls(**values, sink=sink)

    @property
    def sink_blocks(self) -> int:
        """Blocks that hold the sink tokens (kept for the whole request)."""
        return cdiv(self.sink, self.block_size)

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        window_blocks = super().max_admission_blocks_per_request(max_in_flight_tokens, max_model_len)
        return min(cdiv(max_model_len, self.block_size), window_blocks + self.sink_blocks)

    def is_uniform_with_collection(self, kv_cache_specs) -> bool:
        return all(isinstance(spec, SinkWindowSpec) and spec.sliding_window == self.sliding_window
                   and spec.sink == self.sink for spec in kv_cache_specs.values())


class SinkWindowManager(SlidingWindowManager):
    """Frees the blocks between the sink blocks and the window; never the sink blocks."""

    def __init__(self, kv_cache_spec: SinkWindowSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.sink_blocks = kv_cache_spec.sink_blocks

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, *args, **kwargs):
        return tuple([] for _ in kv_cache_group_ids), 0

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        """Free the blocks wholly before the window, except the first :attr:`sink_blocks`."""
        if request_id not in self.req_to_blocks:
            return
        skipped_blocks = self.get_num_skipped_tokens(processed_computed_tokens) // self.block_size
        self._remove_blocks_in_range(request_id, self.sink_blocks, skipped_blocks)

    def held_blocks(self, request_id: str) -> int:
        """Blocks this request holds in the pool now (freed entries point at the null block)."""
        return sum(not block.is_null for block in self.req_to_blocks.get(request_id, ()))


def register_kv_spec() -> None:
    """Register the spec and its manager with vLLM (after its built-in types; idempotent)."""
    ensure_builtin_kv_specs()
    KVCacheSpecRegistry.register(SinkWindowSpec, SinkWindowManager, uniform_type_base_spec=SinkWindowSpec)


__all__ = ["SinkWindowSpec", "SinkWindowManager", "register_kv_spec"]
