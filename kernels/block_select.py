"""Keep key blocks by cumulative attention mass: the selector every sparse-prefill estimator shares.

Given an estimate of the attention mass each query block puts on each key block, a query block keeps its always-kept
blocks (sink + local band, :func:`.block_lists.always_kept`) and then the remaining causal blocks in descending
estimated mass until the kept share of the estimated mass reaches ``alpha``. This is SampleAttention's cumulative
residual attention (CRA, arXiv 2406.15486, Sec. 3) threshold and XAttention's threshold ``tau`` (arXiv
2503.16428, Sec. 2.2), applied per (head, query block); SampleAttention bounds the resulting (renormalized) output
error by ``2 (1 - CRA) max ||v||``. ``alpha >= 1`` keeps every causal block (dense, exactly).
"""

from __future__ import annotations

import torch

from .block_lists import BlockLists, always_kept, lists_from_keep


def select_by_mass(mass: torch.Tensor, always: torch.Tensor, causal: torch.Tensor, alpha: float) -> torch.Tensor:
    """bool keep ``[batch, heads, q_blocks, k_blocks]``.

    Args:
        mass: float ``[batch, heads, q_blocks, k_blocks]``, estimated attention mass (>= 0, any scale per row).
        always: bool ``[q_blocks, k_blocks]`` blocks kept whatever their mass.
        causal: bool ``[q_blocks, k_blocks]`` blocks a query block can see at all.
        alpha: target share of the estimated mass per (batch, head, query block), in ``[0, 1]``.
    """
    if alpha >= 1.0:
        return causal.expand_as(mass).clone()
    mass = torch.where(causal, mass.float().clamp(min=0), 0.0)
    total = mass.sum(-1, keepdim=True)
    base = torch.where(always, mass, 0.0).sum(-1, keepdim=True)
    rest = torch.where(always, 0.0, mass)
    ranked, order = rest.sort(dim=-1, descending=True)
    before = base + ranked.cumsum(-1) - ranked  # mass kept before this block is added
    take = (before < alpha * total) & (ranked > 0)
    keep = torch.zeros_like(take).scatter(-1, order, take)
    return (keep | always) & causal


def lists_for_alpha(mass: torch.Tensor, *, alpha: float, block_q: int, block_k: int, q_offset: int, n_kv: int,
                    n_q: int, sink_blocks: int, local_blocks: int) -> BlockLists:
    """Block lists of :func:`select_by_mass` for the block grid of ``mass [batch, heads, q_blocks, k_blocks]``."""
    q_blocks = mass.shape[2]
    grid = dict(block_q=block_q, block_k=block_k, q_offset=q_offset, n_kv=n_kv, n_q=n_q, device=mass.device)
    always = always_kept(q_blocks, **grid, sink_blocks=sink_blocks, local_blocks=local_blocks)
    causal = always_kept(q_blocks, **grid, sink_blocks=0, local_blocks=n_kv // block_k + 1)
    keep = select_by_mass(mass, always, causal, alpha)
    return lists_from_keep(keep, block_q=block_q, block_k=block_k, q_offset=q_offset, n_kv=n_kv, n_q=n_q)


__all__ = ["select_by_mass", "lists_for_alpha"]
