"""KV-cache size of a dense model and of its hybrid, from the config alone.

Each cached token costs one key and one value vector per KV head per layer, so a dense cache holds
``2 * layers * kv_heads * head_dim * tokens * dtype_bytes`` bytes per sequence. A streaming KV head keeps only
``min(tokens, sink + window)`` tokens (the sink and the window of :func:`lighttransfer.kernels.mask.
streaming_visible`), whatever the length. This is the one formula every table, row and benchmark uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .layout import HybridLayout

if TYPE_CHECKING:
    from .config_block import HybridConfig

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "float8_e4m3fn": 1, "float8_e5m2": 1}
DEFAULT_TOKENS = (8 * 1024, 32 * 1024, 128 * 1024)


@dataclass(frozen=True)
class KVMemoryRow:
    """Cache bytes at one length (batch 1)."""

    tokens: int
    dense_bytes: int
    hybrid_bytes: int

    @property
    def saved_fraction(self) -> float:
        return 1.0 - self.hybrid_bytes / self.dense_bytes if self.dense_bytes else 0.0

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "dense_bytes": self.dense_bytes, "hybrid_bytes": self.hybrid_bytes,
                "saved_fraction": self.saved_fraction}


def kv_cache_bytes(layout: HybridLayout | HybridConfig, *, head_dim: int, dtype_bytes: int, tokens: int, batch: int = 1,
                   native_windows: dict[int, int] | None = None) -> tuple[int, int]:
    """``(original, hybrid)`` KV-cache bytes for ``batch`` sequences of ``tokens`` tokens: the one KV-size formula.

    Args:
        layout: the layout (``num_layers``, ``num_kv_heads``, which KV heads stream, ``sink``, ``window``; its
            ``native_windows`` unless ``native_windows`` is given), or a checkpoint's block.
        head_dim: channels per head.
        dtype_bytes: bytes per cached element (2 for bf16/fp16).
        tokens: sequence length in tokens.
        batch: sequences.
        native_windows: ``{layer: window}`` of the model's own sliding layers, which keep at most ``window``
            tokens in the original and in the hybrid alike (never streaming layers of ours).
    """
    if not isinstance(layout, HybridLayout):
        layout = layout.layout()
    per_head_token = 2 * head_dim * dtype_bytes * batch  # one key + one value vector
    native = layout.native_windows if native_windows is None else native_windows
    heads = (layout.num_layers - len(native)) * layout.num_kv_heads
    streaming = layout.streaming_kv_heads
    kept = min(tokens, layout.sink + layout.window)
    bounded = per_head_token * layout.num_kv_heads * sum(min(tokens, w) for w in native.values())
    original = per_head_token * heads * tokens + bounded
    mixed = per_head_token * ((heads - streaming) * tokens + streaming * kept) + bounded
    return original, mixed


def kv_memory_table(layout: HybridLayout | HybridConfig, *, head_dim: int, dtype_bytes: int,
                    tokens: tuple[int, ...] = DEFAULT_TOKENS,
                    native_windows: dict[int, int] | None = None) -> list[KVMemoryRow]:
    """One :class:`KVMemoryRow` per length in ``tokens`` (batch 1)."""
    return [KVMemoryRow(t, *kv_cache_bytes(layout, head_dim=head_dim, dtype_bytes=dtype_bytes, tokens=t,
                                           native_windows=native_windows))
            for t in tokens]


def format_bytes(n: int) -> str:
    """Binary units: ``1536 -> '1.5 KiB'``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError  # unreachable


__all__ = ["KVMemoryRow", "kv_cache_bytes", "kv_memory_table", "format_bytes", "DTYPE_BYTES", "DEFAULT_TOKENS"]
