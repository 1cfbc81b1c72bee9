"""Block-sparse prefill: which key blocks each query block visits, written once.

Queries are cut into blocks of ``block_q`` rows and keys into blocks of ``block_k`` keys. For every
``(batch, head, query block)`` a *block list* names the key blocks that block attends to: an int32 row of key-block
indices, sorted ascending without repeats, padded with ``-1`` after ``counts`` valid entries. Inside a listed block
the usual rule still holds per element: key ``j`` is visible to query ``i`` (key index ``q_offset + i``) when
``kv_start[b] <= j <= q_offset + i`` and ``j < N``, so the diagonal block is causal and a ragged last block is cut.

Two parts of every list are *always kept* (SampleAttention's local window, MInference's and XAttention's diagonal,
StreamingLLM's sink): the first ``sink_blocks`` key blocks and the ``local_blocks`` key blocks ending at the query
block's diagonal. :func:`always_kept` gives them; the selectors (:mod:`.block_select`) merge them into every list,
and the kernel and its reference visit exactly the listed blocks, no more.

Everything else derives from :func:`visible_blocks` (the kept set of one query block) and :func:`block_list_mask`
(the dense element mask of the references, ``O(n * N)``: test sizes only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LightTransferError


@dataclass(frozen=True)
class BlockLists:
    """Per ``(batch, list head, query block)`` the key blocks to visit.

    Attributes:
        indices: int32 ``[batch, list_heads, q_blocks, max_blocks]``: key-block indices, ascending, unique, ``-1``
            padding after ``counts`` entries. ``list_heads`` is the query heads (one list per query head) or the
            KV heads (one list shared by the query heads of a GQA group).
        counts: int32 ``[batch, list_heads, q_blocks]``: valid entries per row (>= 1 for a causal query block).
        block_q, block_k: rows per query block, keys per key block.
        q_offset: key index of query 0 (``N - n`` when the queries are the last ``n`` keys).
        n_kv: keys ``N``.
        n_q: queries ``n``.
    """

    indices: torch.Tensor
    counts: torch.Tensor
    block_q: int
    block_k: int
    q_offset: int
    n_kv: int
    n_q: int

    @property
    def q_blocks(self) -> int:
        return self.indices.shape[2]

    @property
    def k_blocks(self) -> int:
        return -(-self.n_kv // self.block_k)

    def density(self) -> float:
        """Share of the causal key blocks visited (1.0 = dense), over every (batch, head, query block)."""
        causal = causal_block_counts(self.q_blocks, self.block_q, self.block_k, self.q_offset, self.n_kv, self.n_q)
        total = causal.sum().item() * self.counts.shape[0] * self.counts.shape[1]
        return float(self.counts.sum().item() / max(total, 1))

    def to(self, device) -> BlockLists:
        return BlockLists(self.indices.to(device), self.counts.to(device), self.block_q, self.block_k,
                          self.q_offset, self.n_kv, self.n_q)


def last_causal_block(qb: torch.Tensor | int, block_q: int, block_k: int, q_offset: int, n_kv: int, n_q: int):
    """Key block of the last query row of query block ``qb`` (its diagonal block), clipped to the keys."""
    last_row = torch.clamp(torch.as_tensor(qb) * block_q + block_q - 1, max=n_q - 1) + q_offset
    return torch.clamp(last_row, max=n_kv - 1) // block_k


def causal_block_counts(q_blocks: int, block_q: int, block_k: int, q_offset: int, n_kv: int,
                        n_q: int | None = None) -> torch.Tensor:
    """int64 ``[q_blocks]``: key blocks a query block can see at all under causality (dense block count)."""
    n_q = q_blocks * block_q if n_q is None else n_q
    return last_causal_block(torch.arange(q_blocks), block_q, block_k, q_offset, n_kv, n_q) + 1


def block_pairs(q_blocks: int, *, block_q: int, block_k: int, q_offset: int, n_kv: int, n_q: int,
                device=None) -> torch.Tensor:
    """int64 ``[q_blocks, k_blocks]``: causal (query, key) pairs inside each block (the work a listed block does;
    FLOPs = ``4 * head_dim`` per pair and head)."""
    qb = torch.arange(q_blocks, device=device).view(-1, 1)
    a = (torch.arange(-(-n_kv // block_k), device=device) * block_k).view(1, -1)
    e = torch.clamp(a + block_k, max=n_kv)  # keys [a, e)
    r0 = qb * block_q + q_offset
    r1 = torch.clamp(qb * block_q + block_q, max=n_q) + q_offset  # rows [r0, r1), row i sees keys <= i
    # rows i >= e - 1 see the whole block; rows in [a, e - 1) see i - a + 1 keys
    full_rows = torch.clamp(r1 - torch.maximum(r0, e - 1), min=0)
    lo, hi = torch.maximum(r0, a), torch.minimum(r1, e - 1)  # partial rows [lo, hi)
    cnt = torch.clamp(hi - lo, min=0)
    partial = cnt * (lo - a + 1) + cnt * (cnt - 1) // 2
    return full_rows * (e - a) + partial


def visited_pairs(lists: BlockLists) -> int:
    """Causal (query, key) pairs computed over all listed blocks, summed over batch and list heads."""
    pairs = block_pairs(lists.q_blocks, block_q=lists.block_q, block_k=lists.block_k, q_offset=lists.q_offset,
                        n_kv=lists.n_kv, n_q=lists.n_q, device=lists.indices.device)
    return int((keep_mask(lists) * pairs).sum().item())


def always_kept(q_blocks: int, *, block_q: int, block_k: int, q_offset: int, n_kv: int, n_q: int,
                sink_blocks: int, local_blocks: int, device=None) -> torch.Tensor:
    """bool ``[q_blocks, k_blocks]``: the sink blocks and the local band (``local_blocks`` key blocks ending at the
    diagonal block, which is always among them), limited to causal blocks."""
    k_blocks = -(-n_kv // block_k)
    diag = last_causal_block(torch.arange(q_blocks, device=device), block_q, block_k, q_offset, n_kv, n_q)
    kb = torch.arange(k_blocks, device=device).view(1, -1)
    diag = diag.view(-1, 1)
    # the band also covers every key block the query block's own rows fall in (block_q > block_k)
    first_row_block = (torch.arange(q_blocks, device=device).view(-1, 1) * block_q + q_offset) // block_k
    band_lo = torch.minimum(diag - max(local_blocks, 1) + 1, first_row_block)
    return (kb <= diag) & ((kb < sink_blocks) | (kb >= band_lo))


def lists_from_keep(keep: torch.Tensor, *, block_q: int, block_k: int, q_offset: int, n_kv: int,
                    n_q: int) -> BlockLists:
    """Block lists from a bool keep mask ``[batch, list_heads, q_blocks, k_blocks]`` (ascending order)."""
    k_blocks = keep.shape[-1]
    counts = keep.sum(-1).to(torch.int32)
    width = max(int(counts.max().item()) if counts.numel() else 1, 1)
    # compaction without a sort: kept block j goes to slot (kept blocks before it), dropped ones to a spare slot
    slot = torch.where(keep, keep.cumsum(-1) - 1, width)
    kb = torch.arange(k_blocks, device=keep.device, dtype=torch.int32).expand_as(keep)
    idx = torch.full((*keep.shape[:-1], width + 1), -1, dtype=torch.int32, device=keep.device)
    idx = idx.scatter_(-1, slot, kb)[..., :width]
    idx = torch.where(torch.arange(width, device=keep.device) < counts.unsqueeze(-1), idx, -1).contiguous()
    return BlockLists(idx, counts.contiguous(), block_q, block_k, q_offset, n_kv, n_q)


def dense_lists(batch: int, heads: int, n_q: int, n_kv: int, *, block_q: int, block_k: int, q_offset: int,
                device=None) -> BlockLists:
    """Every causal key block of every query block: block-sparse attention over these equals dense causal."""
    q_blocks = -(-n_q // block_q)
    keep = always_kept(q_blocks, block_q=block_q, block_k=block_k, q_offset=q_offset, n_kv=n_kv, n_q=n_q,
                       sink_blocks=0, local_blocks=n_kv // block_k + 1, device=device)
    keep = keep.view(1, 1, *keep.shape).expand(batch, heads, -1, -1)
    return lists_from_keep(keep, block_q=block_q, block_k=block_k, q_offset=q_offset, n_kv=n_kv, n_q=n_q)


def keep_mask(lists: BlockLists) -> torch.Tensor:
    """bool ``[batch, list_heads, q_blocks, k_blocks]`` of the listed blocks."""
    b, h, qb, _ = lists.indices.shape
    keep = torch.zeros(b, h, qb, lists.k_blocks + 1, dtype=torch.bool, device=lists.indices.device)
    idx = torch.where(lists.indices >= 0, lists.indices.long(), torch.full_like(lists.indices.long(), lists.k_blocks))
    keep.scatter_(-1, idx, True)
    return keep[..., : lists.k_blocks]


def block_list_mask(lists: BlockLists, heads: int, n_q: int, *, kv_start: torch.Tensor | None = None) -> torch.Tensor:
    """Dense bool mask ``[batch, heads, n, N]`` (True = attend) of block-sparse attention over ``lists``.

    ``O(batch * heads * n * N)`` memory: for tests and A/B checks at small sizes only.
    """
    keep = keep_mask(lists)
    group = heads // keep.shape[1]
    keep = keep.repeat_interleave(group, dim=1)
    rows = keep.repeat_interleave(lists.block_q, dim=2)[:, :, :n_q]
    elems = rows.repeat_interleave(lists.block_k, dim=3)[..., : lists.n_kv]
    q_idx = torch.arange(n_q, device=keep.device).view(1, 1, -1, 1) + lists.q_offset
    k_idx = torch.arange(lists.n_kv, device=keep.device).view(1, 1, 1, -1)
    visible = elems & (k_idx <= q_idx)
    if kv_start is not None:
        visible = visible & (k_idx >= kv_start.to(keep.device).long().view(-1, 1, 1, 1))
    return visible


def check_lists(name: str, lists: BlockLists, batch: int, heads: int, kv_heads: int, n_q: int, n_kv: int) -> None:
    """One-line errors for block lists that do not fit the attention call."""
    idx, counts = lists.indices, lists.counts
    if idx.dim() != 4 or counts.shape != idx.shape[:3]:
        raise LightTransferError(f"{name}: block indices must be [batch, heads, q_blocks, max_blocks] and counts "
                                 f"[batch, heads, q_blocks]; got {tuple(idx.shape)} and {tuple(counts.shape)}.")
    if idx.shape[0] != batch or idx.shape[1] not in (heads, kv_heads):
        raise LightTransferError(f"{name}: block lists of shape {tuple(idx.shape)} do not fit batch {batch} with "
                                 f"{heads} query heads / {kv_heads} KV heads (one list per query or per KV head).")
    if idx.shape[2] != -(-n_q // lists.block_q) or lists.n_kv != n_kv or lists.n_q != n_q:
        raise LightTransferError(f"{name}: block lists were built for {idx.shape[2]} query blocks of {lists.block_q} "
                                 f"and {lists.n_kv} keys, the call has {n_q} queries and {n_kv} keys.")
    if lists.block_q < 16 or lists.block_k < 16 or lists.block_q & (lists.block_q - 1) \
            or lists.block_k & (lists.block_k - 1):
        raise LightTransferError(f"{name}: block sizes must be powers of two >= 16, got block_q={lists.block_q}, "
                                 f"block_k={lists.block_k}.")
    if idx.dtype != torch.int32 or counts.dtype != torch.int32:
        raise LightTransferError(f"{name}: block indices and counts must be int32.")


__all__ = ["BlockLists", "block_pairs", "visited_pairs", "always_kept", "lists_from_keep", "dense_lists", "keep_mask", "block_list_mask",
           "causal_block_counts", "last_causal_block", "check_lists"]
