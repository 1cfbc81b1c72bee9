"""Estimators of the attention mass per (query block, key block), one dataclass per method.

Each estimator's :meth:`block_mass` returns float32 ``[batch, heads, q_blocks, k_blocks]``: per query head, the
estimated share of a query row's causal attention that falls in each key block (rows of a block averaged). The
selector (:mod:`.block_select`) turns it into block lists for a target ``alpha``; :func:`estimate_lists` does both.
None materializes ``n x N``: every score matrix is computed in row chunks of at most :data:`CHUNK_ELEMENTS`.

* :class:`SampledRows` (SampleAttention, arXiv 2406.15486, Sec. 4, "query-guided sampling"): exact softmax rows of a
  sampled share of the queries, mass summed per key block. We sample evenly spaced rows inside each query block (its
  last row always among them) and score each query block by its own samples; the paper samples rows over the whole
  prompt and keeps one set of column stripes per head, which per-block lists generalize.
* :class:`VerticalSlash` (MInference, arXiv 2407.02490, Sec. 3.2, Alg. 2): the last ``last_q`` queries' exact
  softmax rows give a vertical score per key and a slash score per diagonal offset. The paper keeps the top-k lines
  and runs a line-sparse kernel; here both scores become block masses (vertical: the key block's sum; slash: the
  exact average over the block's rows of the offsets it covers, by double prefix sums) and are kept by ``alpha``.
* :class:`Antidiagonal` (XAttention, arXiv 2503.16428, Sec. 2.1, Alg. 1): strided antidiagonal sums of each
  ``stride x stride`` sub-block (queries read in reverse inside a group) stand in for its scores; a softmax over
  these reduced scores, summed per key block, is the block mass. We softmax the antidiagonal *mean* (``reduce=
  "mean"``, the sum over ``stride``) by default: with the plain sum (``reduce="sum"``) the reduced softmax was so
  sharp that ``alpha = 0.95`` kept little beyond the always-kept blocks (SmolLM2-135M, 1024 tokens, blocks of 32,
  stride 8: density 0.20 and perplexity +18 % over dense with the sum, 0.58 and +2.1 % with the mean). Blind spot of the method: the antidiagonal of a
  group meets only the diagonals ``i - j`` of the parity of ``stride - 1`` inside it, so a slash at an offset of
  the other parity shows up only through the neighbouring groups' rows.

GQA: scores are computed per query head against its KV head without repeating K (``q`` viewed as
``[batch, kv_heads, group * rows, head_dim]``). The sampled and antidiagonal rows go through
:func:`row_block_mass`: on CUDA a fused Triton kernel that never materializes the rows. Inputs ``q [batch, heads, n, D]`` (queries at key indices
``q_offset .. q_offset + n - 1``) and ``k [batch, kv_heads, N, D]``, post-RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import SUPPORTED_DTYPES
from .block_lists import BlockLists, last_causal_block
from .block_select import lists_for_alpha
from .switch import reference_forced

# score elements per chunk (fp32): 64M = 256 MB
CHUNK_ELEMENTS = 1 << 26


def _grouped_scores(qs: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``qs [B, H, r, D] @ k [B, Hkv, N, D]^T`` per query head, K not repeated; float32 ``[B, H, r, N]``."""
    b, h, r, d = qs.shape
    hkv = k.shape[1]
    s = torch.matmul(qs.reshape(b, hkv, (h // hkv) * r, d), k.transpose(-1, -2))
    return (s.float() * scale).view(b, h, r, k.shape[2])


def row_block_mass(qs, row_pos, k, scale, block_k) -> torch.Tensor:
    """Exact causal softmax rows of ``qs [B, H, r, D]`` (row ``i`` sees keys ``<= row_pos[i]``), summed per key
    block of ``block_k``: float32 ``[B, H, r, k_blocks]``. On CUDA the fused Triton kernel
    (:mod:`.block_mass_triton`: the rows are never materialized), else :func:`row_block_mass_reference`.

    Head dims the kernel walks in whole chunks only (a power of two, or a multiple of 128): on an H200 it gave
    wrong block masses at ``D = 40`` (one chunk of 64, 24 lanes masked) while 16, 32, 128 and 2048 were right; until
    that is understood, other widths take the PyTorch path (chunked, so still no ``N x N`` matrix)."""
    d = qs.shape[-1]
    whole_chunks = d & (d - 1) == 0 or d % 128 == 0
    if qs.is_cuda and not reference_forced() and qs.dtype in SUPPORTED_DTYPES and block_k & (block_k - 1) == 0 \
            and whole_chunks:
        from .block_mass_triton import row_block_mass_triton

        return row_block_mass_triton(qs, k, row_pos, scale=scale, cols_per_block=block_k)
    return row_block_mass_reference(qs, row_pos, k, scale, block_k)


def row_block_mass_reference(qs, row_pos, k, scale, block_k) -> torch.Tensor:
    """:func:`row_block_mass` in PyTorch, the score rows materialized in chunks of :data:`CHUNK_ELEMENTS`."""
    b, h, r, _ = qs.shape
    n_kv = k.shape[2]
    k_blocks = -(-n_kv // block_k)
    out = qs.new_zeros(b, h, r, k_blocks, dtype=torch.float32)
    step = max(1, CHUNK_ELEMENTS // max(b * h * n_kv, 1))
    keys = torch.arange(n_kv, device=qs.device)
    for lo in range(0, r, step):
        hi = min(r, lo + step)
        s = _grouped_scores(qs[:, :, lo:hi], k, scale)
        s = s.masked_fill(keys.view(1, 1, 1, -1) > row_pos[lo:hi].view(1, 1, -1, 1), float("-inf"))
        p = torch.softmax(s, dim=-1)
        pad = k_blocks * block_k - n_kv
        out[:, :, lo:hi] = torch.nn.functional.pad(p, (0, pad)).view(b, h, hi - lo, k_blocks, block_k).sum(-1)
    return out


def _causal_only(mass, q_offset, n, n_kv, block_q, block_k):
    """``mass`` with the key blocks past each query block's diagonal set to zero."""
    diag = last_causal_block(torch.arange(mass.shape[2], device=mass.device), block_q, block_k, q_offset, n_kv, n)
    return mass.masked_fill(torch.arange(mass.shape[3], device=mass.device).view(1, -1) > diag.view(-1, 1), 0.0)


@dataclass(frozen=True)
class SampledRows:
    """SampleAttention-style: ``share`` of each query block's rows (at least one: its last) scored exactly."""

    # 1/64: two rows of a 128-row block; the score rows are materialized (in chunks), so their bytes, not FLOPs,
    # set the cost: 2 * 32 heads * 128k keys * 1k blocks fp32 at 128k is ~34 GB of traffic per pass
    share: float = 1 / 64
    name: str = "sample"

    def rows_per_block(self, block_q: int) -> int:
        return max(1, round(self.share * block_q))

    def block_mass(self, q, k, *, q_offset: int, block_q: int, block_k: int, scale: float) -> torch.Tensor:
        n = q.shape[2]
        q_blocks = -(-n // block_q)
        r = self.rows_per_block(block_q)
        # evenly spaced from the block's last row backwards: the last row sees the most keys
        offs = block_q - 1 - (torch.arange(r, device=q.device) * block_q) // r
        rows = (torch.arange(q_blocks, device=q.device).view(-1, 1) * block_q + offs).clamp(max=n - 1).flatten()
        mass = row_block_mass(q[:, :, rows], rows + q_offset, k, scale, block_k)
        return mass.view(q.shape[0], q.shape[1], q_blocks, r, -1).mean(3)


@dataclass(frozen=True)
class VerticalSlash:
    """MInference-style: vertical and slash scores from the last ``last_q`` queries, turned into block masses."""

    last_q: int = 64
    name: str = "vslash"

    def block_mass(self, q, k, *, q_offset: int, block_q: int, block_k: int, scale: float) -> torch.Tensor:
        b, h, n, _ = q.shape
        n_kv = k.shape[2]
        last = min(self.last_q, n)
        rows = torch.arange(n - last, n, device=q.device)
        pos = rows + q_offset
        keys = torch.arange(n_kv, device=q.device)
        s = _grouped_scores(q[:, :, rows], k, scale)  # [B, H, last, N]: last * N, small
        s = s.masked_fill(keys.view(1, 1, 1, -1) > pos.view(1, 1, -1, 1), float("-inf"))
        p = torch.softmax(s, dim=-1)
        vertical = p.mean(2)  # [B, H, N]
        offset = (pos.view(-1, 1) - keys.view(1, -1)).clamp(min=0)  # [last, N]; non-causal pairs have p = 0
        slash = p.new_zeros(b, h, n_kv).scatter_add_(-1, offset.flatten().expand(b, h, -1), p.flatten(2)) / last

        k_blocks, q_blocks = -(-n_kv // block_k), -(-n // block_q)
        v_block = torch.nn.functional.pad(vertical, (0, k_blocks * block_k - n_kv)).view(b, h, k_blocks, block_k)
        v_block = v_block.sum(-1)  # [B, H, KB]
        # per-row slash mass over key block [a, e]: C[qi - a + 1] - C[qi - e] with C[x] = sum_{0 <= d < x} slash[d];
        # summed over the block's rows by a second prefix sum D[x] = sum_{y < x} C[y] (C, D = 0 for x <= 0)
        c = torch.nn.functional.pad(slash.double().cumsum(-1), (1, 0))  # C[0..N]
        c = torch.cat([c, c[..., -1:].expand(b, h, 2)], -1)  # C beyond N stays the total
        dd = torch.nn.functional.pad(c.cumsum(-1), (1, 0))  # D[0..N+3]

        def big_d(x):  # D at integer tensor x (clamped: D = 0 below 1, linear growth never reached above)
            return dd.index_select(-1, x.clamp(min=0, max=dd.shape[-1] - 1).flatten()).view(b, h, *x.shape)

        qb = torch.arange(q_blocks, device=q.device)
        q_lo = (qb * block_q + q_offset).view(-1, 1)
        q_hi = ((qb * block_q + block_q - 1).clamp(max=n - 1) + q_offset).view(-1, 1)
        a = (torch.arange(k_blocks, device=q.device) * block_k).view(1, -1)
        e = (a + block_k - 1).clamp(max=n_kv - 1)
        rows_in = (q_hi - q_lo + 1).double()
        s_block = (big_d(q_hi - a + 2) - big_d(q_lo - a + 1) - big_d(q_hi - e + 1) + big_d(q_lo - e)) / rows_in
        return _causal_only((v_block.unsqueeze(2) + s_block.float()).clamp(min=0), q_offset, n, n_kv, block_q,
                            block_k)


@dataclass(frozen=True)
class Antidiagonal:
    """XAttention-style: strided antidiagonal scores of ``stride x stride`` sub-blocks, softmaxed, summed per block."""

    # XAttention uses 8 or 16; 16 keeps the reduced score matrix at (n / 16) x (N / 16) per head
    stride: int = 16
    reduce: str = "mean"  # "mean" or "sum" of the antidiagonal's scaled logits (see the module docstring)
    name: str = "antidiag"

    def __post_init__(self) -> None:
        if self.reduce not in ("mean", "sum"):
            from ..errors import LightTransferError

            raise LightTransferError(f"antidiag reduce must be 'mean' or 'sum', got {self.reduce!r}.")

    def block_mass(self, q, k, *, q_offset: int, block_q: int, block_k: int, scale: float) -> torch.Tensor:
        b, h, n, d = q.shape
        hkv, n_kv = k.shape[1], k.shape[2]
        st = self.stride
        # query groups aligned to key indices: group g holds key indices [g * st, g * st + st)
        lead = q_offset % st
        g0 = q_offset // st
        n_groups = -(-(lead + n) // st)
        qp = torch.nn.functional.pad(q, (0, 0, lead, n_groups * st - n - lead))
        k_groups = -(-n_kv // st)
        kp = torch.nn.functional.pad(k, (0, 0, 0, k_groups * st - n_kv))
        # reduced Q row g: its rows in reverse order, concatenated; reduced K column c: its keys in order
        q_red = qp.reshape(b, h, n_groups, st, d).flip(3).reshape(b, h, n_groups, st * d)
        k_red = kp.reshape(b, hkv, k_groups, st * d)  # k may be a strided view (the runtime passes them)
        k_blocks, q_blocks = -(-n_kv // block_k), -(-n // block_q)
        per_kb = block_k // st if block_k % st == 0 else None
        mass = q.new_zeros(b, h, q_blocks, k_blocks, dtype=torch.float32)
        counts = q.new_zeros(q_blocks, dtype=torch.float32)
        g_all = torch.arange(n_groups, device=q.device) + g0
        scale = scale / st if self.reduce == "mean" else scale
        if per_kb is not None:  # the fused path: reduced rows against reduced columns, summed per key block
            pk_all = row_block_mass(q_red, g_all, k_red, scale, per_kb)  # [B, H, n_groups, KB]
        else:  # a stride that does not divide the key block: assign each group to its first key's block
            step = max(1, CHUNK_ELEMENTS // max(b * h * k_groups, 1))
            cols = torch.arange(k_groups, device=q.device)
            pk_all = q.new_zeros(b, h, n_groups, k_blocks, dtype=torch.float32)
            for lo in range(0, n_groups, step):
                hi = min(n_groups, lo + step)
                s = _grouped_scores(q_red[:, :, lo:hi], k_red, scale)
                s = s.masked_fill(cols.view(1, 1, 1, -1) > g_all[lo:hi].view(1, 1, -1, 1), float("-inf"))
                p = torch.softmax(s, dim=-1)
                pk_all[:, :, lo:hi] = p.new_zeros(b, h, hi - lo, k_blocks).index_add_(-1, (cols * st) // block_k, p)
        # a row group belongs to the query block of its first real query
        first_q = (torch.arange(n_groups, device=q.device) * st - lead).clamp(min=0, max=n - 1)
        qbi = first_q // block_q
        mass.index_add_(2, qbi, pk_all[..., :k_blocks])
        counts.index_add_(0, qbi, torch.ones_like(qbi, dtype=torch.float32))
        return _causal_only(mass / counts.clamp(min=1).view(1, 1, -1, 1), q_offset, n, n_kv, block_q, block_k)


ESTIMATORS = {"sample": SampledRows, "vslash": VerticalSlash, "antidiag": Antidiagonal}


def make_estimator(name: str, **options):
    """The estimator called ``name`` (``sample``, ``vslash``, ``antidiag``) with its options."""
    from ..errors import LightTransferError

    if name not in ESTIMATORS:
        raise LightTransferError(f"sparse prefill method {name!r} is not known; use one of {sorted(ESTIMATORS)}.")
    return ESTIMATORS[name](**options)


def estimate_lists(estimator, q: torch.Tensor, k: torch.Tensor, *, alpha: float, block_q: int, block_k: int,
                   sink_blocks: int = 1, local_blocks: int = 1, q_offset: int | None = None,
                   scale: float | None = None, gqa_lists: str = "query") -> BlockLists:
    """Block lists that keep ``alpha`` of the estimated mass, plus the sink and band: one per query head
    (``gqa_lists="query"``) or one per KV head (``"kv-union"``, ``"kv-sum"``: :func:`.block_select.group_keep`).

    ``q_offset`` defaults to ``N - n`` (the queries are the last ``n`` keys); ``scale`` to ``head_dim ** -0.5``.
    """
    n, n_kv = q.shape[2], k.shape[2]
    q_offset = n_kv - n if q_offset is None else q_offset
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mass = estimator.block_mass(q, k, q_offset=q_offset, block_q=block_q, block_k=block_k, scale=scale)
    return lists_for_alpha(mass, alpha=alpha, block_q=block_q, block_k=block_k, q_offset=q_offset, n_kv=n_kv, n_q=n,
                           sink_blocks=sink_blocks, local_blocks=local_blocks, kv_heads=k.shape[1],
                           gqa_lists=gqa_lists)


__all__ = ["SampledRows", "VerticalSlash", "Antidiagonal", "ESTIMATORS", "make_estimator", "estimate_lists",
           "row_block_mass", "row_block_mass_reference", "CHUNK_ELEMENTS"]
