"""Where a streaming layer keeps each token: ``sink`` fixed slots, then a ring buffer of ``window`` slots.

A streaming cache layer holds ``sink + window`` slots per sequence (the rule of
:func:`lighttransfer.kernels.mask.streaming_visible`: a query at position ``p`` sees the first ``sink`` tokens
and the positions ``(p - window, p]``). Token position ``p`` (0-based, counted from the sequence's first real
token, so left padding does not shift it) lives in slot

    slot(p) = p                          if p < sink
            = sink + (p - sink) mod W    otherwise,

so after the sequence has reached position ``last`` the ring holds exactly ``(last - window, last]`` and the
token that a new one overwrites is the one that has just left every later query's window.

Positions are never re-indexed: keys are stored with the RoPE of their original position (as LightTransfer
does), and each slot records that position (``-1`` = empty) so attention can apply the rule exactly.

Everything here is pure integer arithmetic on tensors; no device sync.
"""

from __future__ import annotations

import torch


def slot_of(pos: torch.Tensor, *, sink: int, window: int) -> torch.Tensor:
    """Slot index of each token position (``pos >= 0``), same shape and dtype as ``pos``."""
    ring = sink + torch.remainder(pos - sink, window)
    return torch.where(pos < sink, pos, ring)


def slot_positions(last: torch.Tensor, n_slots: int, *, sink: int, window: int) -> torch.Tensor:
    """Position each slot holds after sequence ``b`` has reached position ``last[b]`` (``-1`` = empty).

    Args:
        last: int ``[batch]`` position of each sequence's newest token (``-1`` when it has none yet).
        n_slots: slots allocated (at most ``sink + window``).

    Returns:
        int64 ``[batch, n_slots]``.
    """
    last = last.long().unsqueeze(-1)  # [B, 1]
    s = torch.arange(n_slots, device=last.device).unsqueeze(0)  # [1, A]
    # the ring slot r = s - sink holds the newest position p <= last with (p - sink) mod window == r
    newest = last - torch.remainder(last - s, window)
    pos = torch.where(s < sink, s.expand_as(newest), newest)
    valid = (pos >= 0) & (pos <= last) & ((s < sink) | (pos >= sink))
    return torch.where(valid, pos, torch.full_like(pos, -1))


__all__ = ["slot_of", "slot_positions"]
