"""The training-time attention patterns, written once: S²-Attn for full layers, sink + window for streaming ones.

**S²-Attn** (shifted sparse attention, LongLoRA, Chen et al., arXiv 2309.12307, Sec. 3.2). The sequence is cut
into groups of ``group_size`` tokens (a quarter of the training length by default). Half of the query heads
attend within the groups ``[0, G), [G, 2G), ...``; the other half within the groups shifted by half a group,
``[0, G/2), [G/2, 3G/2), ...``, so that information crosses every boundary of the first grid. Every pattern is
causal. Inference keeps full attention in these layers: S²-Attn only makes training cheaper (the visible pairs
are about ``G / N`` of dense causal attention's).

**Where we deviate: the shift never wraps around.** LongLoRA's non-flash reference shifted with
``torch.roll(-G/2)`` along the sequence, which puts the first ``G/2`` tokens into one group with the last
``G/2``, *after* them in the rolled order: the first tokens then attend to the end of the sequence, i.e. to the
future (LongLoRA issues #15 and #90; their later flash path partitions without rolling). Here a shifted head's
group of position ``p`` is ``(p + G/2) // G``, so the first and the last shifted groups are half groups and no
group ever holds tokens from both ends. ``tests/test_training_masks.py`` keeps a ``torch.roll``-style
implementation and checks that the brute-force comparison catches it.

**With sinks** (SinkLoRA's idea, Zhang, arXiv 2406.05678: global "sink attention tokens" beside S²-Attn), an
S² head also sees the first ``s2_sink`` tokens, as our streaming layers do; ``s2_sink = 0`` is plain S²-Attn.

**Streaming layers** train with the attention they run: :func:`lighttransfer.kernels.mask.streaming_visible`
(the first ``sink`` tokens + the last ``window``, causal). The model's own sliding layers keep their window.

One predicate covers every head of every layer: a head has a ``sink``, a ``window``, a ``group`` and a ``shift``
(:class:`HeadRule`), and sees key ``k`` from query ``q`` when::

    streaming_visible(q, k, sink, window) and (k < sink or (q + shift) // group == (k + shift) // group)

Plain causal is ``sink 0, window = group = LONG``; a streaming head ``group = LONG``; an S² head
``window = LONG``. :func:`dense_mask` (the CPU path, explicit-mask SDPA) and :func:`flex_mask_mod`
(FlexAttention block masks on CUDA) both evaluate :func:`head_visible`, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LightTransferError
from ..kernels.mask import streaming_visible

# "unbounded" for a window or a group: longer than any sequence (and small enough for int32 arithmetic)
LONG = 1 << 30


def s2_group_size(seq_len: int, group_frac: float) -> int:
    """Tokens per S²-Attn group: ``round(group_frac * seq_len)``, at least 2 (so that the shift is >= 1), even.

    Raises:
        LightTransferError: ``group_frac`` outside ``(0, 1]``.
    """
    if not 0.0 < group_frac <= 1.0:
        raise LightTransferError(f"--group-frac must be in (0, 1], got {group_frac}.")
    size = max(2, round(group_frac * seq_len))
    return size + (size % 2)


def s2_shifted_heads(num_heads: int) -> list[bool]:
    """Which query heads use the shifted groups: the second half (``h >= num_heads // 2``), as in LongLoRA."""
    return [h >= num_heads // 2 for h in range(num_heads)]


@dataclass(frozen=True)
class HeadRule:
    """What one query head may see: the first ``sink`` keys, keys less than ``window`` back, within its group.

    ``group`` tokens per group with the grid moved by ``shift`` (``0`` or ``group // 2``); ``LONG`` for
    "unbounded". All values are token counts.
    """

    sink: int = 0
    window: int = LONG
    group: int = LONG
    shift: int = 0


CAUSAL = HeadRule()


def head_visible(q_pos, k_pos, sink, window, group, shift):
    """Whether query ``q_pos`` sees key ``k_pos`` under a head's rule; elementwise on ints or broadcastable
    integer tensors (absolute positions, 0-based; the rule's fields may be tensors too)."""
    same_group = torch.div(q_pos + shift, group, rounding_mode="floor") == \
        torch.div(k_pos + shift, group, rounding_mode="floor")
    return streaming_visible(q_pos, k_pos, sink, window) & ((k_pos < sink) | same_group)


def s2_rule(group_size: int, *, shifted: bool, sink: int = 0) -> HeadRule:
    """An S²-Attn head: groups of ``group_size``, the grid moved by half a group when ``shifted``."""
    return HeadRule(sink=sink, window=LONG, group=group_size, shift=group_size // 2 if shifted else 0)


def streaming_rule(sink: int, window: int) -> HeadRule:
    """A streaming head: the first ``sink`` tokens and the last ``window`` (``kernels/mask.py``)."""
    return HeadRule(sink=sink, window=window)


def sliding_rule(window: int) -> HeadRule:
    """The model's own sliding window (no sink): keys in ``(q - window, q]``."""
    return HeadRule(sink=0, window=window)


@dataclass(frozen=True)
class LayerRules:
    """The rules of one layer's query heads, ``[num_heads]`` :class:`HeadRule` (hashable: a cache key)."""

    heads: tuple[HeadRule, ...]

    @property
    def is_causal(self) -> bool:
        return all(h == CAUSAL for h in self.heads)

    def tensors(self, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(sink, window, group, shift)``, each int32 ``[num_heads]``."""
        cols = zip(*((h.sink, h.window, h.group, h.shift) for h in self.heads), strict=True)
        return tuple(torch.tensor(c, dtype=torch.int32, device=device) for c in cols)  # type: ignore[return-value]

    def visible_pairs(self, seq_len: int) -> int:
        """Visible (query, key) pairs summed over heads, counted one query row at a time (never ``N x N``):
        the work the attention does, for FLOP counts."""
        total = 0
        q = torch.arange(seq_len).unsqueeze(1)
        for h in set(self.heads):
            count = 0
            for start in range(0, seq_len, 1024):
                rows = q[start : start + 1024]
                count += int(head_visible(rows, torch.arange(seq_len), h.sink, h.window, h.group, h.shift).sum())
            total += count * self.heads.count(h)
        return total


def layer_rules(
    num_heads: int,
    *,
    streaming_heads: list[bool] | tuple[bool, ...],
    sink: int,
    window: int,
    s2_group: int | None,
    s2_sink: int = 0,
    native_window: int | None = None,
) -> LayerRules:
    """The rules of one layer's ``num_heads`` query heads.

    Args:
        streaming_heads: ``[num_heads]``, True where the head's KV head streams (the layout's mask, repeated
            over each GQA group).
        sink, window: the hybrid's streaming rule.
        s2_group: S²-Attn group size for the other heads, or ``None`` for plain causal attention.
        s2_sink: keys every S² head also sees (SinkLoRA-style sinks; 0 = plain S²-Attn).
        native_window: the model's own sliding window of this layer (kept as it is, no S²-Attn), or ``None``.
    """
    if len(streaming_heads) != num_heads:
        raise ValueError(f"streaming_heads has {len(streaming_heads)} entries for {num_heads} heads")
    shifted = s2_shifted_heads(num_heads)
    rules = []
    for h in range(num_heads):
        if streaming_heads[h]:
            rules.append(streaming_rule(sink, window))
        elif native_window is not None:
            rules.append(sliding_rule(native_window))
        elif s2_group is not None:
            rules.append(s2_rule(s2_group, shifted=shifted[h], sink=s2_sink))
        else:
            rules.append(CAUSAL)
    return LayerRules(tuple(rules))


def dense_mask(rules: LayerRules, seq_len: int, *, device=None) -> torch.Tensor:
    """bool ``[num_heads, seq_len, seq_len]`` (True = attend): the explicit mask of the CPU path and the tests.

    ``O(heads * seq_len^2)`` memory: only for the short sequences a CPU trains on (CUDA uses block masks)."""
    sink, window, group, shift = (t.view(-1, 1, 1) for t in rules.tensors(device))
    pos = torch.arange(seq_len, device=device, dtype=torch.int32)
    return head_visible(pos.view(1, -1, 1), pos.view(1, 1, -1), sink, window, group, shift)


def flex_mask_mod(rules: LayerRules, *, device=None):
    """The same rule as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (per-head values captured as
    ``[num_heads]`` tensors)."""
    sink, window, group, shift = rules.tensors(device)

    def mask_mod(b, h, q_idx, kv_idx):
        return head_visible(q_idx, kv_idx, sink[h], window[h], group[h], shift[h])

    return mask_mod


def flex_block_mask(rules: LayerRules, seq_len: int, *, device, compile_mask: bool = True):
    """A FlexAttention ``BlockMask`` for ``[1, num_heads, seq_len, seq_len]`` from :func:`flex_mask_mod`.

    ``compile_mask`` builds it through ``torch.compile``, which fuses the mask into the block reduction instead of
    materializing the ``heads x N x N`` boolean mask (needed at long context; the tests build small ones eagerly)."""
    from torch.nn.attention.flex_attention import create_block_mask

    build = torch.compile(create_block_mask) if compile_mask else create_block_mask
    return build(flex_mask_mod(rules, device=device), B=None, H=len(rules.heads), Q_LEN=seq_len, KV_LEN=seq_len,
                 device=device)


__all__ = ["LONG", "HeadRule", "CAUSAL", "LayerRules", "head_visible", "s2_group_size", "s2_shifted_heads",
           "s2_rule", "streaming_rule", "sliding_rule", "layer_rules", "dense_mask", "flex_mask_mod",
           "flex_block_mask"]
