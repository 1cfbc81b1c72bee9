"""Perplexity on long text, scored only where streaming matters.

Sliding evaluation: windows of ``length`` tokens start every ``stride`` tokens; each window prefills its first
``length - stride`` tokens and scores its last ``stride`` tokens, so every scored token sees at least
``length - stride`` tokens of context and each text token is scored at most once. A streaming layer differs
from a full one only for queries farther than ``sink + window`` from the start, so the prefix must be at least
``sink + window`` long: tokens before it would score the same for every row and dilute the comparison.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import LightTransferError
from .scoring import continuation_logits, token_nll


@dataclass(frozen=True)
class PerplexityWindow:
    """One scored window: tokens ``[start, start + length)``; positions ``>= split`` (window-relative) scored."""

    start: int
    length: int
    split: int


def default_stride(length: int, min_context: int) -> int:
    """A quarter of the window, but never so much that scored tokens fall inside ``min_context``."""
    return max(1, min(length // 4, length - min_context))


def plan_windows(
    num_tokens: int, *, length: int, stride: int, min_context: int, max_windows: int
) -> list[PerplexityWindow]:
    """Windows for sliding evaluation over ``num_tokens`` of text.

    Args:
        length: window (context) length in tokens.
        stride: scored tokens per window; windows start every ``stride`` tokens.
        min_context: the prefix every scored token must see (``sink + window`` of the rows compared).
        max_windows: stop after this many windows.

    Raises:
        LightTransferError: when no token lies beyond ``min_context`` or the text is too short.
    """
    if stride < 1:
        raise LightTransferError(f"--stride must be at least 1 token, got {stride}.")
    split = length - stride
    if split < min_context:
        raise LightTransferError(
            f"at context {length} with stride {stride} the scored tokens start at {split}, inside sink + window "
            f"({min_context}); use a longer --lengths entry or a smaller --stride."
        )
    windows = []
    start = 0
    while start + length <= num_tokens and len(windows) < max_windows:
        windows.append(PerplexityWindow(start=start, length=length, split=split))
        start += stride
    if not windows:
        raise LightTransferError(
            f"the evaluation text has {num_tokens} tokens, fewer than one window of {length}; "
            "pass a longer --text or shorter --lengths."
        )
    return windows


def window_nll(model, token_ids: torch.Tensor, window: PerplexityWindow, *, after_prefill=None) -> torch.Tensor:
    """NLL (nats) of each scored token of ``window``: ``[stride]`` float32."""
    device = next(model.parameters()).device
    ids = token_ids[window.start : window.start + window.length].unsqueeze(0).to(device)
    logits = continuation_logits(model, ids, window.split, after_prefill=after_prefill)
    return token_nll(logits, ids[:, window.split :])[0].cpu()


def perplexity(
    sequence: Callable,
    token_ids: torch.Tensor,
    windows: list[PerplexityWindow],
    *,
    on_window: Callable[[], None] | None = None,
) -> dict:
    """Perplexity over ``windows`` of ``token_ids [num_tokens]`` for one row.

    Args:
        sequence: ``() -> context manager yielding (model, after_prefill)``, one per window (a row's backend).
    Returns:
        ``{"ppl", "nll", "tokens", "windows"}`` (``nll``: mean nats per scored token).
    """
    total, count = 0.0, 0
    for window in windows:
        with sequence() as (model, after_prefill):
            nll = window_nll(model, token_ids, window, after_prefill=after_prefill)
        total += float(nll.double().sum())
        count += nll.numel()
        if on_window is not None:
            on_window()
    mean = total / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count, "windows": len(windows)}


__all__ = ["PerplexityWindow", "plan_windows", "default_stride", "window_nll", "perplexity"]
