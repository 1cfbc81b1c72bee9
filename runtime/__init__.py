"""Run a hybrid checkpoint: streaming layers keep ``sink + window`` KV entries, full layers keep everything.

``lighttransfer.load(path)`` returns an ordinary transformers causal LM. How it works:

* **Attention.** One function is registered in transformers' ``AttentionInterface`` under ``"lighttransfer"``
  and the model's attention implementation is set to it (:mod:`.attention`). Full layers prefill through SDPA
  and decode through the GQA split-K kernel :func:`lighttransfer.kernels.full_decode` on CUDA; streaming layers call the Triton kernels of :mod:`lighttransfer.kernels` on CUDA
  and their PyTorch references on the CPU; mixed layers (some KV heads stream) run both groups and put the heads
  back in order. Nothing else in transformers is touched, so a plain model works beside a hybrid one.
* **Cache.** :class:`HybridCache` is a transformers ``Cache`` whose parts are :class:`FullLayer` (full layers:
  storage preallocated and grown geometrically, new tokens written in place, never a whole-cache copy per step),
  :class:`StreamingLayer` (``sink`` fixed slots + a ring of ``window`` slots, each slot recording its token's
  absolute position) and :class:`MixedLayer` (full heads whole, streaming heads in an inner ring).
* **Positions.** Keys are cached with the RoPE of their original position and never re-indexed, as LightTransfer
  does; the mask rule uses the same positions (counted from each sequence's first real token, so left padding
  does not shift the sink).
* **generate / pipelines.** A forward pre-hook on the base model replaces an empty ``DynamicCache`` (what
  ``generate`` makes, in transformers 5.17 under ``past_key_values``, in 5.24 under ``cache``) or a missing
  cache with a fresh :class:`HybridCache`, reads the left padding from the 2-D attention mask, and passes both to
  the attention function as an extra keyword. ``generate`` then carries on with the cache the model returned.
  For manual loops, :func:`make_cache` gives a fresh cache.
* **Prefill.** ``streaming`` (default) or ``full`` (full attention in prefill, streaming caches trimmed right
  after); :func:`prefill_chunked` (or ``load(..., chunk_size=N)``, which sets ``generate``'s
  ``prefill_chunk_size``) bounds prefill memory with the same result as one pass.
* **Sparse prefill.** ``load(..., prefill_sparse="sample", prefill_alpha=0.95, prefill_min_len=16384)`` runs the
  full layers' long prefills block-sparse (:mod:`.sparse_prefill`); :func:`sparse_prefill_stats` gives the
  realised density per layer.
* **Online mode.** ``load(..., online_ratio=r)`` picks the streaming layers per prompt (:mod:`.online`).
* **Fused ops.** ``load(..., fused_ops=None)`` (on for CUDA models): RMSNorm, RoPE and SiLU-mul as single Triton
  launches and q/k/v, gate/up as one GEMM each, rewired on the model instance (:mod:`.fused_ops`).
* **TokenSelect.** ``load(..., decode="tokenselect")``: the full layers' decode steps attend only the keys a soft
  vote of the heads selects, with the Selection Cache (:mod:`.token_select`); on a hybrid or a plain model.
* **Head routing.** ``load(..., head_routing="qada", routing_tau=...)``: per decode query, each KV head of the full
  layers attends sink + window of its cache or every key (QAdA, :mod:`.head_routing`); :func:`head_routing_stats`
  gives the realised local share, :func:`calibrate_head_routing` picks ``tau`` per layer for a target share.
"""

from .cache import FullLayer, HybridCache, MixedLayer, SequenceState, StreamingLayer
from .chunked import prefill_chunked
from .fused_ops import FusedOps, fuse_model, is_fused, unfuse_model
from .generation import GenerationStats, generate_text
from .graphs import StaticDecoder
from .head_routing import HeadRouting, RoutingStats
from .head_routing_calibration import calibrate_head_routing, far_share_distribution, far_share_summary
from .hybrid import (
    disable_hybrid,
    enable_hybrid,
    head_routing_stats,
    make_cache,
    runtime_of,
    sparse_prefill_stats,
)
from .layout import resolve_layout
from .loader import load, load_hybrid
from .online import OnlineSelector
from .static_generate import generate_static
from .token_select import SelectionState, SelectionStats, token_select_attention

__all__ = [
    "load",
    "load_hybrid",
    "enable_hybrid",
    "disable_hybrid",
    "make_cache",
    "runtime_of",
    "prefill_chunked",
    "generate_text",
    "generate_static",
    "StaticDecoder",
    "GenerationStats",
    "HybridCache",
    "FullLayer",
    "StreamingLayer",
    "MixedLayer",
    "SequenceState",
    "resolve_layout",
    "OnlineSelector",
    "SelectionStats",
    "SelectionState",
    "token_select_attention",
    "sparse_prefill_stats",
    "fuse_model",
    "unfuse_model",
    "is_fused",
    "FusedOps",
    "head_routing_stats",
    "calibrate_head_routing",
    "far_share_distribution",
    "far_share_summary",
    "HeadRouting",
    "RoutingStats",
]
