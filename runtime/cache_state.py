"""What every part of the hybrid cache shares: the batch's left padding (:class:`SequenceState`), the views a
layer's ``update`` leaves for the attention function, and the base layer that counts every token it has seen."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import CacheLayerMixin


class SequenceState:
    """What every layer of one cache shares about the batch: left padding, and whether to defer compaction.

    Attributes:
        kv_start: int64 ``[batch]`` left-padding count of each sequence (its first real token's index), or
            ``None`` before the first forward. Position of the token at index ``j`` is ``j - kv_start[b]``.
        min_start, max_start: ``min(kv_start)`` and ``max(kv_start)`` as Python ints (so slot counts and the
            choice of the chunked-prefill path need no device sync).
        has_padding: whether any sequence is left-padded.
        defer_compaction: set by chunked prefill under the ``full`` prefill policy, so that streaming layers keep
            their whole history until the last chunk (full attention in prefill stays exact).
        static: the device-side counters of static decode steps (:class:`StaticStep`), or ``None`` (the dynamic
            path: shapes follow the tokens held).
    """

    def __init__(self) -> None:
        self.kv_start: torch.Tensor | None = None
        self.min_start = 0
        self.max_start = 0
        self.has_padding = False
        self.defer_compaction = False
        self.static: StaticStep | None = None

    def observe(self, attention_mask: torch.Tensor | None, batch: int, device: torch.device,
                new_tokens: int) -> torch.Tensor:
        """Record the left padding from the 2-D ``attention_mask`` ``[batch, past + new]`` (1 = real token).

        It is re-read on every multi-token forward, because the first chunks of a chunked prefill may still be all
        padding for some sequence (its count only grows until its first real token arrives); one-token forwards
        reuse it, so decoding needs no device sync. Returns ``kv_start``."""
        if attention_mask is not None and attention_mask.dim() == 2 and (self.kv_start is None or new_tokens > 1):
            self.kv_start = leading_padding(attention_mask).to(device)
            self.min_start = int(self.kv_start.min().item())
            self.max_start = int(self.kv_start.max().item())
            self.has_padding = self.max_start > 0
        elif self.kv_start is None:
            self.kv_start = torch.zeros(batch, dtype=torch.long, device=device)
        return self.kv_start

    def select(self, index: torch.Tensor) -> None:
        if self.kv_start is not None:
            self.kv_start = self.kv_start[index.to(self.kv_start.device)]


class StaticStep:
    """Where the next decode step writes, held in device memory, so that the step has the same shapes and reads
    no host value at every token (what a CUDA graph captured once replays).

    Every sequence of a batch is at the same token index (left padding is stored as tokens), so one index serves
    the whole batch; positions differ by the left padding.

    Attributes:
        index: int64 ``[1]``: token index the new token is written at (tokens held before it).
        n_valid: int32 ``[1]``: ``index + 1``, the keys a full layer holds once the new one is written.
        q_pos: int64 ``[batch, 1]``: the new token's position ``index - kv_start[b]`` (RoPE position and the
            streaming rule's query position; negative for a sequence that has no real token yet).
    """

    def __init__(self, index: int, kv_start: torch.Tensor) -> None:
        device = kv_start.device
        self.index = torch.tensor([index], dtype=torch.long, device=device)
        self.n_valid = torch.tensor([index + 1], dtype=torch.int32, device=device)
        self.q_pos = (index - kv_start.long()).view(-1, 1).clone()

    def reset(self, index: int, kv_start: torch.Tensor) -> None:
        """The counters of a new generation, written into the same tensors (a captured graph reads these)."""
        self.index.fill_(index)
        self.n_valid.fill_(index + 1)
        self.q_pos.copy_((index - kv_start.long()).view(-1, 1))

    def advance(self) -> None:
        """One token on, in place (recorded into a captured graph, so each replay moves the counters)."""
        self.index.add_(1)
        self.n_valid.add_(1)
        self.q_pos.add_(1)


def leading_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """Number of leading zeros of each row of a 2-D mask ``[batch, seq]`` (int64 ``[batch]``).

    Only left padding shifts positions; zeros after the first real token (right padding) sit after every real
    query and are never seen by one under causal attention.
    """
    return (attention_mask.long().cumsum(-1) == 0).sum(-1)


@dataclass
class ContiguousView:
    """Keys returned by ``update`` are the whole history in index order: key ``j`` at position
    ``j - kv_start[b]``; the queries are keys ``q_offset ..``; ``full`` = full causal attention (prefill policy
    ``full``) instead of sink + window."""

    q_offset: int
    full: bool


@dataclass
class SlotView:
    """Keys returned by ``update`` are slots with explicit positions ``slot_pos`` (int32 ``[batch, N]``,
    ``-1`` = empty); the queries sit at ``q_pos`` (int32 ``[batch, n]``)."""

    slot_pos: torch.Tensor
    q_pos: torch.Tensor


@dataclass
class ChunkView:
    """A chunk of ``n`` new tokens against a ring whose sink is complete, split in two parts that the prefill
    kernel handles directly and whose softmaxes are merged by their log-sum-exp: the sink keys
    (``sink_keys``/``sink_values`` ``[B, Hkv, sink, D]``, seen by every query) and the keys ``update`` returned,
    ``[recent (window, oldest first), chunk]`` with contiguous positions, the first ``recent_start[b]`` of them
    empty (int32 ``[B]``), attended with sink 0 and the window."""

    sink_keys: torch.Tensor
    sink_values: torch.Tensor
    recent_start: torch.Tensor


class CountingLayer(CacheLayerMixin):
    """A cache layer that reports every token it has seen, whatever it keeps, so that transformers' position
    and mask bookkeeping stays that of the dense model (``self.seen``: tokens processed so far)."""

    seen: int = 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1


# FullLayer storage growth: to max(GROWTH x, + GROWTH_MIN_TOKENS) tokens, rounded up to CAPACITY_ALIGN tokens.
# 1.25x (and at least 1024 tokens) rather than 2x (+4096): a long-context batch is sized to fill the GPU and the
# full layers hold most of its cache; 2x (or +4096 on a 4k prompt) could double them at the first decoded token.
# Growth stays geometric: O(log n) copies of the history, each worth ~2 decode steps of that layer's traffic,
# one every >= n/4 steps. A generation of known length avoids them with HybridCache(max_tokens=...)/reserve().


def tensor_nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


__all__ = ["SequenceState", "StaticStep", "leading_padding", "ContiguousView", "SlotView", "ChunkView", "CountingLayer",
           "tensor_nbytes"]
