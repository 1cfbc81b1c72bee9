"""Lazy ratio (LightTransfer, arXiv 2410.13846, Eq. 1): how much attention stays on the sink + window keys.

For a query at position ``p`` with causal softmax attention ``A[p, j]`` over keys ``j <= p``, the lazy mass is

    m(p) = sum over j with streaming_visible(p, j, sink, window) of A[p, j]

that is, the share of the query's attention on the keys a streaming layer would keep for it: the first
``sink`` tokens and the query's own last ``window`` positions ``(p - window, p]`` (the rule of
:func:`lighttransfer.kernels.mask.streaming_visible`). The paper calls these the *recent* keys and measures them
as the sample's last ``window`` tokens; we use each query's own window instead, because that is exactly
what the runtime keeps, so the ratio predicts what streaming loses. A layer's lazy ratio is ``m`` averaged
over the last ``last`` queries of a sample and over all query heads; ``1 - m`` is the long-context mass.

The blockwise computation, :func:`streaming_attention_mass`, lives in :mod:`lighttransfer.kernels.attention_mass`
(the runtime's online mode computes it too); this module gives its meaning and the per-head summaries.

We implement the definition, not the paper's published pseudo-code, which (a) omits the 1/sqrt(d) scale of
the scores, (b) normalizes the softmax over the wrong rows and (c) has no causal mask among the window keys.

Cost: only the ``last`` query rows are used, and keys are visited in blocks with a running log-sum-exp in
fp32 (natural log), so memory is ``O(batch * heads * last * block)``, never ``seq * seq``.
"""

from __future__ import annotations

import torch

from ..kernels.attention_mass import DEFAULT_BLOCK, stats_workspace_bytes, streaming_attention_mass


def head_statistics(mass: torch.Tensor, *, threshold: float) -> dict[str, torch.Tensor]:
    """Per-head summaries of the per-query lazy mass.

    Args:
        mass: ``[..., q_len]`` lazy mass of each query (from :func:`streaming_attention_mass`).
        threshold: long-context mass above which a query counts as reaching far back.

    Returns:
        ``lazy_ratio`` (mean mass), ``long_context_mass`` (mean of ``1 - mass``) and ``long_query_share``
        (share of queries with ``1 - mass > threshold``), each ``[...]`` float32.
    """
    far = 1.0 - mass
    return {
        "lazy_ratio": mass.mean(dim=-1),
        "long_context_mass": far.mean(dim=-1),
        "long_query_share": (far > threshold).float().mean(dim=-1),
    }


__all__ = ["streaming_attention_mass", "head_statistics", "stats_workspace_bytes", "DEFAULT_BLOCK"]
