"""How vLLM 0.32 splits a hybrid's layers into KV cache groups, and what its padding costs (plain Python).

vLLM gives every KV cache group the same number of layers, so that one block of its pool holds a page of each
layer of a group (``_get_kv_cache_groups_uniform_page_size`` in ``vllm/v1/core/kv_cache_utils.py``). The group
size is the smaller of the per-kind layer counts, or the larger one when it is under 1.5x the smaller; the last
group of each kind is padded with empty layers, which take their share of every block that group allocates.
Padding a full-attention group costs as much KV memory as that many more full layers; padding a streaming
group costs only their bounded share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class VllmGrouping:
    """vLLM's KV cache groups for ``streaming`` + ``full`` layers.

    Attributes:
        group_size: layers per group.
        streaming_groups, full_groups: how many groups of each kind.
        streaming_padding, full_padding: empty layers added to each kind.
    """

    group_size: int
    streaming_groups: int
    full_groups: int
    streaming_padding: int
    full_padding: int

    def describe(self) -> str:
        """One line for ``inspect`` and the plugin's log."""
        line = (f"vLLM KV cache groups of {self.group_size} layers ({self.streaming_groups} streaming, "
                f"{self.full_groups} full)")
        if self.full_padding:
            return (line + f"; {self.full_padding} padding layers among the full ones cost as much KV memory as "
                    f"{self.full_padding} more full layers: pick a --ratio whose streaming and full counts are "
                    "equal or divide one another")
        if self.streaming_padding:
            return line + f"; {self.streaming_padding} padding layers among the streaming ones (bounded, cheap)"
        return line + "; no padding"


def vllm_grouping(num_streaming: int, num_full: int) -> VllmGrouping | None:
    """The grouping of vLLM 0.32 for these counts; ``None`` when one kind is absent (one group type only)."""
    if num_streaming <= 0 or num_full <= 0:
        return None
    low, high = min(num_streaming, num_full), max(num_streaming, num_full)
    size = high if high < 1.5 * low else low

    def pad(n: int) -> int:
        return -n % size

    return VllmGrouping(group_size=size, streaming_groups=math.ceil(num_streaming / size),
                        full_groups=math.ceil(num_full / size), streaming_padding=pad(num_streaming),
                        full_padding=pad(num_full))


__all__ = ["VllmGrouping", "vllm_grouping"]
