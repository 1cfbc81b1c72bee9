"""Online layer selection (LightTransfer-Test, arXiv 2410.13846, Sec. 5): pick the lazy layers per prompt.

During the prompt's first forward every layer attends fully. Right after layer ``l``'s attention we measure its
lazy ratio on the prompt's last ``last`` queries (Eq. 1: the share of their attention on the sink + window keys,
computed blockwise by :func:`lighttransfer.analysis.lazy_ratio.streaming_attention_mass`) and offer it to a
running selection that keeps the ``P`` least lazy layers seen so far full.

Rule (a running top-P, the priority queue of the paper): the held set is a max-heap on the lazy ratio. A new
layer joins it; when it then holds ``P + 1`` layers, the laziest is popped and its cache is trimmed to
sink + window at once. A popped layer can never come back (every later layer that enters pushes out something
at least as lazy), so when the last layer has been offered the held set is exactly the ``P`` least lazy layers
of the whole model, and no layer's full cache outlives the moment it stops being among the ``P`` least lazy so
far. Peak prefill memory is therefore ``P + 1`` full layers plus the streaming ones, not the dense cache.
"""

from __future__ import annotations

import heapq

import torch

DEFAULT_LAST = 32


class OnlineSelector:
    """The running selection for one prompt (one cache).

    Args:
        num_layers: decoder layers.
        keep: ``P``, layers that stay full (``num_layers - round(ratio * num_layers)``).
        last: queries at the end of the prompt whose attention is measured.
    """

    def __init__(self, *, num_layers: int, keep: int, last: int = DEFAULT_LAST) -> None:
        if not 0 <= keep <= num_layers:
            raise ValueError(f"keep must be in [0, {num_layers}], got {keep}")
        self.num_layers, self.keep, self.last = num_layers, keep, last
        self.ratios: dict[int, float] = {}
        self._held: list[tuple[float, int]] = []  # (-lazy ratio, -layer): the laziest is on top

    @classmethod
    def for_ratio(cls, *, num_layers: int, ratio: float, last: int = DEFAULT_LAST) -> OnlineSelector:
        """Stream ``round(ratio * num_layers)`` layers, keep the rest full."""
        streamed = int(round(ratio * num_layers))
        return cls(num_layers=num_layers, keep=num_layers - streamed, last=last)

    @property
    def decided(self) -> bool:
        return len(self.ratios) >= self.num_layers

    @property
    def full_layers(self) -> list[int]:
        return sorted(-layer for _, layer in self._held)

    @property
    def streaming_layers(self) -> list[int]:
        held = set(self.full_layers)
        return sorted(i for i in self.ratios if i not in held)

    def offer(self, layer_idx: int, ratio: float) -> list[int]:
        """Record layer ``layer_idx``'s lazy ratio; return the layers to turn streaming now (0 or 1 of them)."""
        if layer_idx in self.ratios:
            return []
        self.ratios[layer_idx] = float(ratio)
        heapq.heappush(self._held, (-float(ratio), -layer_idx))
        if len(self._held) > self.keep:
            _, neg_layer = heapq.heappop(self._held)
            return [-neg_layer]
        return []


def prompt_lazy_ratio(q: torch.Tensor, k: torch.Tensor, *, q_offset: int, kv_start: torch.Tensor | None,
                      sink: int, window: int, scale: float, last: int) -> float:
    """Lazy ratio of one layer on the prompt's last ``last`` queries, averaged over sequences and heads.

    Args:
        q: ``[batch, heads, n, head_dim]`` post-RoPE queries of this forward (queries sit at keys
            ``q_offset ..``).
        k: ``[batch, kv_heads, N, head_dim]`` post-RoPE keys of the whole history, left-padded by ``kv_start``.

    Returns:
        The mean share of attention on sink + window keys, in [0, 1] (a Python float: one device sync).
    """
    from ..kernels.attention_mass import streaming_attention_mass

    n, big_n = q.shape[2], k.shape[2]
    masses = []
    starts = [0] * q.shape[0] if kv_start is None else [int(s) for s in kv_start.tolist()]
    for b, start in enumerate(starts):
        real_q = min(n, big_n - start, q_offset + n - start)
        take = min(last, real_q)
        if take <= 0:
            continue
        keys = k[b:b + 1, :, start:]
        mass = streaming_attention_mass(q[b:b + 1, :, n - take:], keys, q_offset=keys.shape[2] - take,
                                        sink=sink, window=window, scale=scale)
        masses.append(mass.mean())
    if not masses:
        return 1.0
    return float(torch.stack(masses).mean().item())


__all__ = ["OnlineSelector", "prompt_lazy_ratio", "DEFAULT_LAST"]
