"""Keep key blocks by cumulative attention mass: the selector every sparse-prefill estimator shares.

Given an estimate of the attention mass each query block puts on each key block, a query block keeps its always-kept
blocks (sink + local band, :func:`.block_lists.always_kept`) and then the remaining causal blocks in descending
estimated mass until the kept share of the estimated mass reaches ``alpha``. This is SampleAttention's cumulative
residual attention (CRA, arXiv 2406.15486, Sec. 3) threshold and XAttention's threshold ``tau`` (arXiv
2503.16428, Sec. 2.2), applied per (head, query block); SampleAttention bounds the resulting (renormalized) output
error by ``2 (1 - CRA) max ||v||``. ``alpha >= 1`` keeps every causal block (dense, exactly).

**Sorting only the causal blocks.** A query block can take only the key blocks up to its diagonal, so
:func:`select_by_mass` cuts the query blocks into bands and sorts each band only over the key blocks its last query
block can see: about ``1/2 + 1/(2 * bands)`` of the elements of a sort of the whole ``[batch, heads, q_blocks,
k_blocks]`` mass (:func:`select_by_mass_sorted`, kept as the reference), with the same kept set (up to which of
several blocks of exactly equal mass is taken). A ``topk`` per row that doubles ``k`` until ``alpha`` is reached
was measured too and lost at ``alpha = 0.95`` (the kept share of a row is ~0.2, so several rounds; NOTES).

**GQA** (:func:`group_keep`): lists per KV head, so that the kernel can pack a KV head's query heads into one tile
(:mod:`.sparse_prefill_triton`), come from the per-query-head masses in one of two ways:

* ``"kv-union"``: each query head selects on its own, the KV head visits the union. Every query head still keeps at
  least ``alpha`` of its own estimated mass (the quality of per-query-head lists, never less), at a density between
  the per-head density and ``GROUP`` times it.
* ``"kv-sum"``: one selection on the group's summed mass (each head's rows sum to 1, so every head weighs the same).
  The group as a whole keeps ``alpha``; a head whose mass sits where its group's does not can keep less.
"""

from __future__ import annotations

import torch

from .block_lists import BlockLists, always_kept, lists_from_keep

GQA_LISTS = ("query", "kv-union", "kv-sum")


def select_by_mass_sorted(mass: torch.Tensor, always: torch.Tensor, causal: torch.Tensor,
                          alpha: float) -> torch.Tensor:
    """:func:`select_by_mass` by a full descending sort of every row (the reference of the selector)."""
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


def select_by_mass(mass: torch.Tensor, always: torch.Tensor, causal: torch.Tensor, alpha: float,
                   *, bands: int = 8) -> torch.Tensor:
    """bool keep ``[batch, heads, q_blocks, k_blocks]``.

    Args:
        mass: float ``[batch, heads, q_blocks, k_blocks]``, estimated attention mass (>= 0, any scale per row).
        always: bool ``[q_blocks, k_blocks]`` blocks kept whatever their mass.
        causal: bool ``[q_blocks, k_blocks]`` blocks a query block can see at all.
        alpha: target share of the estimated mass per (batch, head, query block), in ``[0, 1]``.
        bands: the query blocks go in this many bands, each sorting only the key blocks its last query block can
            see (the causal triangle: about ``1/2 + 1/(2 * bands)`` of the full sort's elements). Changes the
            cost, never the result.
    """
    if alpha >= 1.0:
        return causal.expand_as(mass).clone()
    # one pass for the candidates (causal, not always kept), one masked sum for the always-kept mass
    rest = mass.float().clamp(min=0).masked_fill(~causal | always, 0.0)
    base = mass.float().clamp(min=0).masked_fill(~always, 0.0).sum(-1, keepdim=True)
    need = alpha * (rest.sum(-1, keepdim=True) + base) - base  # mass still to take after the always-kept blocks
    q_blocks = rest.shape[2]
    # the last causal key block of each query block, on the host once (one synchronization, not one per band)
    last_col = causal.int().cumsum(-1).argmax(-1).tolist()
    keep = torch.zeros_like(rest, dtype=torch.bool)
    step = -(-q_blocks // max(1, bands))
    for lo in range(0, q_blocks, step):
        hi = min(q_blocks, lo + step)
        width = max(last_col[lo:hi]) + 1
        ranked, order = rest[:, :, lo:hi, :width].sort(dim=-1, descending=True)
        take = (ranked.cumsum(-1) - ranked < need[:, :, lo:hi]) & (ranked > 0)
        keep[:, :, lo:hi, :width].scatter_(-1, order, take)
    return keep | (always & causal)


def group_keep(mass: torch.Tensor, always: torch.Tensor, causal: torch.Tensor, alpha: float, *, kv_heads: int,
               gqa_lists: str) -> torch.Tensor:
    """bool keep ``[batch, list_heads, q_blocks, k_blocks]``: per query head (``gqa_lists="query"``) or per KV head
    (``"kv-union"`` / ``"kv-sum"``, see the module docstring) from per-query-head ``mass [batch, heads, ...]``."""
    if gqa_lists not in GQA_LISTS:
        from ..errors import LightTransferError

        raise LightTransferError(f"gqa_lists must be one of {', '.join(GQA_LISTS)}, got {gqa_lists!r}.")
    b, h, qb, kb = mass.shape
    if gqa_lists == "query" or kv_heads == h:
        return select_by_mass(mass, always, causal, alpha)
    if gqa_lists == "kv-union":
        return select_by_mass(mass, always, causal, alpha).view(b, kv_heads, h // kv_heads, qb, kb).any(2)
    summed = mass.float().clamp(min=0).view(b, kv_heads, h // kv_heads, qb, kb).sum(2)
    return select_by_mass(summed, always, causal, alpha)


def lists_for_alpha(mass: torch.Tensor, *, alpha: float, block_q: int, block_k: int, q_offset: int, n_kv: int,
                    n_q: int, sink_blocks: int, local_blocks: int, kv_heads: int | None = None,
                    gqa_lists: str = "query") -> BlockLists:
    """Block lists of :func:`select_by_mass` for the block grid of ``mass [batch, heads, q_blocks, k_blocks]``,
    per query head, or per KV head (``kv_heads`` of them) with ``gqa_lists`` ``"kv-union"`` or ``"kv-sum"``."""
    q_blocks = mass.shape[2]
    grid = dict(block_q=block_q, block_k=block_k, q_offset=q_offset, n_kv=n_kv, n_q=n_q, device=mass.device)
    always = always_kept(q_blocks, **grid, sink_blocks=sink_blocks, local_blocks=local_blocks)
    causal = always_kept(q_blocks, **grid, sink_blocks=0, local_blocks=n_kv // block_k + 1)
    keep = group_keep(mass, always, causal, alpha, kv_heads=kv_heads or mass.shape[1], gqa_lists=gqa_lists)
    return lists_from_keep(keep, block_q=block_q, block_k=block_k, q_offset=q_offset, n_kv=n_kv, n_q=n_q)


__all__ = ["select_by_mass", "select_by_mass_sorted", "group_keep", "lists_for_alpha", "GQA_LISTS"]
