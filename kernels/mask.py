"""The streaming-attention rule, written once.

A query at absolute position ``p`` sees key position ``j`` when the key is causal (``j <= p``) and is either a
*sink* token (``j < sink``) or inside the *window* of the ``window`` most recent positions (``p - j < window``,
i.e. ``j`` in ``(p - window, p]``). The query's own key is always in its window (``window >= 1``).

Everything else derives from :func:`streaming_visible`: the dense boolean mask of the PyTorch references, the
FlexAttention ``mask_mod`` of the benchmarks, the lazy ratio of the analysis (the attention mass a query puts on
exactly the keys it would keep) and the runtime's bounded cache (``sink`` slots + a ring buffer of ``window``).
"""

from __future__ import annotations

import torch


def streaming_visible(q_pos, k_pos, sink: int, window: int):
    """Whether a query at ``q_pos`` sees a key at ``k_pos`` under sink + sliding-window attention.

    Works elementwise on ints or broadcastable integer tensors (absolute token positions, 0-based).
    """
    causal = k_pos <= q_pos
    return causal & ((k_pos < sink) | (q_pos - k_pos < window))


def causal_visible(q_pos, k_pos):
    """Plain causal attention: a query sees every key at or before its own position."""
    return k_pos <= q_pos


def streaming_mask(
    q_len: int,
    k_len: int,
    *,
    sink: int,
    window: int,
    q_offset: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Dense boolean mask ``[q_len, k_len]`` (True = attend) for queries at ``q_offset + i`` and keys at ``j``.

    ``q_offset`` defaults to ``k_len - q_len`` (the queries are the last ``q_len`` tokens of the keys).
    Only for references and tests: it is ``O(q_len * k_len)`` memory.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if sink < 0:
        raise ValueError(f"sink must be >= 0, got {sink}")
    if q_offset is None:
        q_offset = k_len - q_len
    q_pos = torch.arange(q_len, device=device).unsqueeze(-1) + q_offset
    k_pos = torch.arange(k_len, device=device).unsqueeze(0)
    return streaming_visible(q_pos, k_pos, sink, window)


__all__ = ["streaming_visible", "causal_visible", "streaming_mask"]
