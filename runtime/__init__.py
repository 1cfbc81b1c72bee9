"""Run a hybrid checkpoint: streaming layers keep ``sink + window`` KV entries, full layers keep everything.

``lighttransfer.load(path)`` returns an ordinary transformers causal LM whose attention goes through the
``"lighttransfer"`` attention function and whose ``generate`` uses a bounded :class:`HybridCache`.
"""

from .cache import HybridCache, SequenceState, StreamingLayer
from .chunked import prefill_chunked
from .hybrid import disable_hybrid, enable_hybrid, make_cache, runtime_of
from .layout import RuntimeLayout, resolve_layout
from .loader import load, load_hybrid
from .online import OnlineSelector

__all__ = [
    "load",
    "load_hybrid",
    "enable_hybrid",
    "disable_hybrid",
    "make_cache",
    "runtime_of",
    "prefill_chunked",
    "HybridCache",
    "StreamingLayer",
    "SequenceState",
    "RuntimeLayout",
    "resolve_layout",
    "OnlineSelector",
]
