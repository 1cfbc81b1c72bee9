"""Merge two partial attention results over disjoint key sets by their log-sum-exp.

Used for chunked prefill against a compacted streaming cache: one call attends the sink slots, one the
contiguous recent keys (``sink=0``), and the two softmaxes are recombined exactly (the identity behind
flash-decoding's split-K: ``o = (e^{lse1} o1 + e^{lse2} o2) / (e^{lse1} + e^{lse2})``).
"""

from __future__ import annotations

import torch


def merge_attention(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine ``(o1, lse1)`` and ``(o2, lse2)`` computed over disjoint key sets.

    Args:
        o1, o2: partial outputs ``[batch, heads, seq, head_dim]`` (any float dtype).
        lse1, lse2: their log-sum-exp ``[batch, heads, seq]``, float32, natural log; ``-inf`` marks a row with
            no visible key in that part (its output is ignored).

    Returns:
        ``(o, lse)``: ``o`` in ``o1``'s dtype, ``lse`` float32 natural log (``-inf`` where neither part saw a key,
        with ``o`` zero there).
    """
    lse1 = lse1.float()
    lse2 = lse2.float()
    lse = torch.logaddexp(lse1, lse2)
    # rows where both parts are empty: keep lse=-inf and avoid (-inf) - (-inf) = nan
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w1 = torch.exp(lse1 - safe).unsqueeze(-1)
    w2 = torch.exp(lse2 - safe).unsqueeze(-1)
    o = w1 * o1.float() + w2 * o2.float()
    return o.to(o1.dtype), lse


__all__ = ["merge_attention"]
