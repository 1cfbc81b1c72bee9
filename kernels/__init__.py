"""Streaming-attention, full-layer decode (dense, or routed per KV head) and block-sparse prefill kernels
(Triton), the fused element-wise ops of a decoder layer (RMSNorm, RoPE, SiLU-mul), with plain PyTorch references
and a switch between them; the sparse-prefill estimators and the head-routing rule beside them.

The Triton modules are imported on first use, so that ``TRITON_INTERPRET`` can still be set before any kernel
is defined and ``import lighttransfer.kernels`` stays cheap.
"""

if __package__ == "lighttransfer.kernels":
    from .attention import MAX_HEAD_DIM, SUPPORTED_DTYPES, streaming_attention, streaming_decode
    from .block_lists import BlockLists, dense_lists
    from .full import full_decode
    from .fused_ops import (
        apply_rope,
        apply_rope_reference,
        rms_norm,
        rms_norm_reference,
        silu_mul,
        silu_mul_reference,
    )
    from .fused_routing import fused_routed_decode, fused_routed_decode_reference
    from .head_routing import KeyMoments, exact_far_share, predicted_far_share, random_local, route_local
    from .mask import causal_visible, streaming_mask, streaming_visible
    from .merge import merge_attention
    from .reference import full_decode_reference, streaming_attention_reference, streaming_decode_reference
    from .routed_decode import routed_decode, routed_decode_reference
    from .selection_cache import selection_lookup, selection_lookup_reference
    from .sparse_estimators import Antidiagonal, SampledRows, VerticalSlash, estimate_lists
    from .sparse_prefill import block_sparse_attention, block_sparse_attention_reference
    from .switch import reference_forced, triton_runs_on, use_reference
    from .token_select import (
        assemble_indices,
        fresh_selection,
        query_positions,
        select_attention,
        select_attention_reference,
        select_indices,
        token_votes,
        token_votes_reference,
        top_candidates,
        total_votes,
    )

    __all__ = [
        "streaming_attention",
        "streaming_decode",
        "full_decode",
        "full_decode_reference",
        "rms_norm",
        "rms_norm_reference",
        "apply_rope",
        "apply_rope_reference",
        "silu_mul",
        "silu_mul_reference",
        "routed_decode",
        "routed_decode_reference",
        "fused_routed_decode",
        "fused_routed_decode_reference",
        "KeyMoments",
        "predicted_far_share",
        "exact_far_share",
        "route_local",
        "random_local",
        "streaming_attention_reference",
        "streaming_decode_reference",
        "merge_attention",
        "token_votes",
        "token_votes_reference",
        "total_votes",
        "fresh_selection",
        "selection_lookup",
        "selection_lookup_reference",
        "query_positions",
        "top_candidates",
        "assemble_indices",
        "select_indices",
        "select_attention",
        "select_attention_reference",
        "use_reference",
        "reference_forced",
        "triton_runs_on",
        "streaming_visible",
        "causal_visible",
        "streaming_mask",
        "SUPPORTED_DTYPES",
        "MAX_HEAD_DIM",
        "block_sparse_attention",
        "block_sparse_attention_reference",
        "BlockLists",
        "dense_lists",
        "estimate_lists",
        "SampledRows",
        "VerticalSlash",
        "Antidiagonal",
    ]
else:
    # Imported as a top-level `kernels` because a checkout's root is on sys.path (`python -c`/`-m` run there):
    # this folder then shadows the hub's unrelated `kernels` package, which transformers imports (a dependency of
    # transformers since 5.25). Hand the name over to that package where it is installed; elsewhere stay an empty
    # module without a version, which transformers reads as "not installed", instead of failing the import.
    __all__ = []

    def _hand_over() -> None:
        import importlib
        import os
        import sys

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        saved = sys.path[:]
        shadow = sys.modules.pop(__name__, None)
        sys.path[:] = [p for p in saved if os.path.abspath(p or os.curdir) != root]
        try:
            real = importlib.import_module(__name__)
        except ImportError:
            real = None
        finally:
            sys.path[:] = saved
        # the import system returns what sys.modules holds once this module's code has run
        sys.modules[__name__] = real if real is not None else shadow

    _hand_over()
    del _hand_over
