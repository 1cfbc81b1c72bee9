"""TokenSelect (Wu et al., arXiv 2411.02886): per-head Q·K criticality, a soft vote over the heads, top-k tokens.

The rule, per full layer, per sequence and per query at key index ``p`` (keys are cached after RoPE, so every token
keeps its original position and nothing is re-indexed), with ``s = kv_start[b]`` the sequence's left padding:

* always kept: the first ``init`` real tokens ``[s, s + init)`` and the local window ``(p - local, p]``;
* candidates: every other key ``t`` with ``s + init <= t <= p - local``;
* per-head criticality ``c_h(t) = scale * q_h · k_{g(h), t}``, ``g(h) = h // (heads // kv_heads)`` (query heads of
  a KV head are contiguous, as in Llama/Qwen; the released code maps ``h % kv_heads``, which is wrong for them);
* soft vote (the paper's per-head softmax normalisation before summing, so that no single head with large logits
  decides alone): ``S(t) = sum_h softmax_t(c_h)(t)``, the softmax over the candidates only;
* selected: the ``k`` candidates of largest ``S`` (one set per layer and sequence, shared by all its heads), plus
  the kept tokens. Attention then runs over those keys only (:func:`select_attention`).

Split into kernels the way the work splits on a GPU: the vote reads every candidate key, the top-k is
:func:`~lighttransfer.kernels.topk_rows.topk_rows` (an exact radix select that skips the sequences whose Selection
Cache hit; ``TOPK = "torch"`` takes ``torch.topk`` instead), and :func:`select_attention` reads only the selected keys and values. Exact
softmax normalisation needs each head's log-sum-exp over all candidates before any vote can be summed, so there are two vote kernels:
:func:`total_votes` (the decode step's: the keys read once, every head's float32 scores kept in ``[rows, heads,
N]`` scratch between its two passes, the vote summed over all heads, ``[rows, N]``) and :func:`token_votes` (the
keys read twice, a statistics pass then the vote pass, no scratch; the ``[batch, kv_heads, N]`` vote per KV head).
:func:`fresh_selection` turns a decode step's votes into its list in one launch after ``torch.topk`` (no sort, no
host synchronization); :func:`select_indices` / :func:`assemble_indices` build the sorted lists of the reference
and of reused selections.

References here are plain PyTorch in float32; the Triton kernels (:mod:`.token_select_triton`) must match them.
"""

from __future__ import annotations

import math
import os

import torch

from ..errors import LightTransferError
from .attention import check_qkv, check_triton_support
from .switch import triton_runs_on

# queries per block in the references (bounds their [block, N] and [block, S, D] temporaries)
REFERENCE_QUERY_BLOCK = 64
# the decode step's top-k on the Triton path: "radix" (kernels.topk_rows, which skips the rows whose Selection
# Cache hit; the default: on an H200 over 128k it halves a hit step at batch 1 and wins from ~50% hits at batch 16,
# bench/results/tokenselect_kernels_h200/run3_lookup_radix) or "torch" (torch.topk over every row);
# LIGHTTRANSFER_SELECT_TOPK sets it at import
TOPK = os.environ.get("LIGHTTRANSFER_SELECT_TOPK", "radix")
if TOPK not in ("torch", "radix"):
    raise LightTransferError(f"LIGHTTRANSFER_SELECT_TOPK must be torch or radix, got {TOPK!r}.")


def query_positions(n_keys: int, n_queries: int, *, n_valid: torch.Tensor | None, device) -> torch.Tensor:
    """int64 ``[1, n]``: the key index of each of the last ``n`` queries, ``n_keys - n + i``, or ``n_valid - n + i``
    where only the first ``n_valid`` (int ``[1]`` on the device: a static step's live length) of the ``n_keys`` keys
    exist; computed on the device (no host synchronization)."""
    offs = torch.arange(n_queries, device=device).view(1, n_queries)
    if n_valid is None:
        return offs + (n_keys - n_queries)
    return offs + (n_valid.to(device=device, dtype=torch.long).view(1, 1) - n_queries)


def candidate_bounds(n_keys: int, n_queries: int, *, kv_start: torch.Tensor | None, batch: int, init: int,
                     local: int, device, n_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo [batch, 1], hi [batch, n])`` int64: query ``i`` (at key index ``p = n_keys - n + i``, or ``n_valid - n +
    i``, see :func:`query_positions`) has the candidates ``lo <= t < hi`` (``lo = kv_start + init``, ``hi = p + 1 -
    local``); empty where ``hi <= lo``."""
    start = torch.zeros(batch, dtype=torch.long, device=device) if kv_start is None \
        else kv_start.to(device=device, dtype=torch.long)
    pos = query_positions(n_keys, n_queries, n_valid=n_valid, device=device)
    return (start + init).view(batch, 1), (pos + 1 - local).expand(batch, n_queries)


def token_votes_reference(q: torch.Tensor, k: torch.Tensor, *, init: int, local: int,
                          kv_start: torch.Tensor | None = None, scale: float | None = None,
                          n_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Soft votes ``[batch, kv_heads, n, N]`` float32 of the queries ``q [B, H, n, D]`` (the last ``n`` keys) over
    the keys ``k [B, Hkv, N, D]``: per KV head, the sum over its query heads of each head's softmax over the
    candidates; ``-inf`` outside the candidates (and everywhere for a query without candidates). ``n_valid``: only
    the first ``n_valid`` keys exist (int ``[1]`` on the device), the queries are their last ``n``."""
    batch, heads, n, dim = q.shape
    kv_heads, n_keys = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    lo, hi = candidate_bounds(n_keys, n, kv_start=kv_start, batch=batch, init=init, local=local, device=q.device,
                              n_valid=n_valid)
    t = torch.arange(n_keys, device=q.device).view(1, 1, n_keys)
    out = torch.full((batch, kv_heads, n, n_keys), float("-inf"), dtype=torch.float32, device=q.device)
    for a in range(0, n, REFERENCE_QUERY_BLOCK):
        b_ = min(n, a + REFERENCE_QUERY_BLOCK)
        cand = (t >= lo.view(batch, 1, 1)) & (t < hi[:, a:b_].unsqueeze(-1))  # [B, nb, N]
        for g in range(kv_heads):
            qg = q[:, g * group:(g + 1) * group, a:b_].float()  # [B, G, nb, D]
            s = torch.matmul(qg, k[:, g].float().transpose(-1, -2).unsqueeze(1)) * scale  # [B, G, nb, N]
            s = s.masked_fill(~cand.unsqueeze(1), float("-inf"))  # also any non-finite key past n_valid
            p = torch.softmax(s, dim=-1).nan_to_num(0.0).sum(1)  # [B, nb, N]
            out[:, g, a:b_] = torch.where(cand, p, float("-inf"))
    return out


def _check_vote_inputs(what: str, q, k, *, init: int, local: int, kv_start, rows, scale) -> float:
    """The one-line errors of :func:`token_votes` and :func:`total_votes`; returns the score scale (default
    ``1 / sqrt(head_dim)``)."""
    check_qkv(what, q, k, k)
    _check_counts(what, init=init, local=local)
    if q.shape[2] != 1:
        raise LightTransferError(f"{what}: one query per sequence, got {q.shape[2]}; use "
                                 "token_votes_reference for several.")
    _check_start(what, kv_start, q.shape[0])
    if rows is not None and rows.dim() != 1:
        raise LightTransferError(f"{what}: rows must be 1-D sequence indices, got {tuple(rows.shape)}.")
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _reference_votes(q, k, *, init: int, local: int, kv_start, scale: float, rows, n_valid=None) -> torch.Tensor:
    """Per-KV-head votes ``[B or len(rows), Hkv, N]`` of one query per sequence by the reference, only the sequences
    in ``rows`` when given."""
    if rows is not None:
        rows = rows.to(q.device).long()
        q, k = q.index_select(0, rows), k.index_select(0, rows)
        kv_start = None if kv_start is None else kv_start.to(q.device).index_select(0, rows)
    return token_votes_reference(q, k, init=init, local=local, kv_start=kv_start, scale=scale,
                                 n_valid=n_valid)[:, :, 0]


def token_votes(q: torch.Tensor, k: torch.Tensor, *, init: int, local: int, kv_start: torch.Tensor | None = None,
                scale: float | None = None, splits: int | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
    """Soft votes of one query per sequence (a decode step): ``q [B, H, 1, D]``, ``k [B, Hkv, N, D]`` (the query is
    the last key) -> ``[B, Hkv, N]`` float32, ``-inf`` outside the candidates (see the module docstring).

    ``rows``: int ``[R]`` indices of the sequences to score (the others are not read); the result is then
    ``[R, Hkv, N]`` in that order (the Selection Cache scores only the sequences that missed).

    Triton for CUDA tensors (or under ``TRITON_INTERPRET=1``): all query heads of a KV head in one program, the key
    axis split over programs; the reference otherwise. ``splits`` forces the split count (Triton only; tests).
    """
    scale = _check_vote_inputs("token_votes", q, k, init=init, local=local, kv_start=kv_start, rows=rows,
                               scale=scale)
    if not triton_runs_on(q):
        return _reference_votes(q, k, init=init, local=local, kv_start=kv_start, scale=scale, rows=rows)
    check_triton_support("token_votes", q)
    from .token_select_triton import token_votes_triton

    return token_votes_triton(q, k, init=init, local=local, kv_start=kv_start, scale=scale, splits=splits,
                              rows=rows)


def total_votes(q: torch.Tensor, k: torch.Tensor, *, init: int, local: int, kv_start: torch.Tensor | None = None,
                scale: float | None = None, splits: int | None = None,
                rows: torch.Tensor | None = None, skip: torch.Tensor | None = None,
                n_valid: torch.Tensor | None = None) -> torch.Tensor:
    """The soft vote summed over all heads, ``S(t) = sum_h softmax_t(c_h)(t)``, of one query per sequence:
    ``q [B, H, 1, D]``, ``k [B, Hkv, N, D]`` -> ``[B, N]`` float32 (``[len(rows), N]`` with ``rows``), ``-inf``
    outside the candidates. The same votes as :func:`token_votes` summed over its KV heads.

    ``skip``: bool ``[B]`` on the device, sequences not to score (their Selection Cache hit): their votes are all
    ``-inf`` and, in the kernel, their programs read no key. Unlike ``rows`` it keeps the batch's shape, so the
    step that uses it has no host synchronization (not with ``rows``).

    ``n_valid``: int ``[1]`` on the device, a static step's live length: only the first ``n_valid`` keys of ``k``
    exist (the layer's whole storage), the query is key ``n_valid - 1``, and the votes past it are ``-inf`` (no key
    there is read), so one captured launch serves every length.

    Triton (:mod:`.token_select_onepass`): the candidate keys are read once (the per-head scores kept in float32
    scratch ``[rows, H, N]`` between the two passes instead of recomputed); the reference otherwise.
    """
    scale = _check_vote_inputs("total_votes", q, k, init=init, local=local, kv_start=kv_start, rows=rows,
                               scale=scale)
    if skip is not None and (rows is not None or tuple(skip.shape) != (q.shape[0],)):
        raise LightTransferError(f"total_votes: skip must be [batch] = [{q.shape[0]}] (and not with rows), got "
                                 f"{tuple(skip.shape)}.")
    _check_valid("total_votes", n_valid)
    if not triton_runs_on(q):
        votes = _reference_votes(q, k, init=init, local=local, kv_start=kv_start, scale=scale, rows=rows,
                                 n_valid=n_valid).sum(1)
        return votes if skip is None else votes.masked_fill(skip.to(votes.device).view(-1, 1), float("-inf"))
    check_triton_support("total_votes", q)
    from .token_select_onepass import total_votes_triton

    return total_votes_triton(q, k, init=init, local=local, kv_start=kv_start, scale=scale, splits=splits,
                              rows=rows, skip=skip, n_valid=n_valid)


def fresh_selection(votes: torch.Tensor, *, k_select: int, init: int, local: int,
                    kv_start: torch.Tensor | None = None, hit: torch.Tensor | None = None,
                    cached: torch.Tensor | None = None, anchor_pos: torch.Tensor | None = None, extra: int = 0,
                    out: torch.Tensor | None = None,
                    n_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh selection of one query per sequence from its total votes ``[R, N]`` (:func:`total_votes`; the query
    is the last key, ``kv_start [R]`` the rows' left padding): ``(picked [R, k_select] int64, indices [R, 1,
    init + k_select + local] int32)``, ``-1`` = none / unused slot; ``picked`` is what the Selection Cache keeps
    (a set: in the order of the votes in the reference, in no particular order from the kernel path).

    The list holds the same keys as :func:`assemble_indices` (init, top-k, the local window, each once). Triton:
    ``torch.topk`` (unsorted) and one launch that writes both outputs, the list in the order ``[init | top-k | recent]``
    (:func:`select_attention` needs no order), with no host synchronization, so it can be captured in a CUDA
    graph. The reference: :func:`top_candidates` then :func:`assemble_indices` (ascending).

    Selection Cache (a decode step mixing hits and misses, still without host synchronization): ``hit [R]`` bool,
    ``cached [R, k_select]`` int64 the rows' cached top-k and ``anchor_pos [R]`` int64 the key index of the query
    it was made with. Hit rows keep ``cached`` (their votes are not read) and the recent keys ``(anchor_pos -
    local, query]``; every row's list then has ``init + k_select + local + extra`` slots, so a hit's age
    (``query - anchor_pos``) must be at most ``extra`` (the caller's bound: ``TokenSelectConfig.reuse_max_age``;
    keys past the list would be dropped). ``picked`` is ``where(hit, cached, fresh)``; ``out`` (Triton only, may be
    ``cached`` itself) receives it in place.

    ``n_valid`` (int ``[1]`` on the device, a static step): the votes cover a storage of ``N`` slots of which the
    first ``n_valid`` are keys; the query is key ``n_valid - 1`` (init, recent and hit-age bounds follow it), and
    the list never holds a key at or past ``n_valid``."""
    if votes.dim() != 2:
        raise LightTransferError(f"fresh_selection: votes must be [rows, N], got {tuple(votes.shape)}.")
    rows, n_keys = votes.shape
    _check_counts("fresh_selection", init=init, local=local)
    _check_start("fresh_selection", kv_start, rows)
    if hit is not None and (cached is None or anchor_pos is None or tuple(hit.shape) != (rows,)
                            or tuple(cached.shape) != (rows, int(k_select)) or tuple(anchor_pos.shape) != (rows,)):
        raise LightTransferError(f"fresh_selection: hit [R], cached [R, k_select] and anchor_pos [R] go together "
                                 f"(R = {rows}, k_select = {k_select}).")
    _check_valid("fresh_selection", n_valid)
    if not triton_runs_on(votes):
        picked = top_candidates(votes.unsqueeze(1), k_select)[:, 0]
        picked = torch.nn.functional.pad(picked, (0, int(k_select) - picked.shape[-1]), value=-1)
        if hit is None:
            return picked, assemble_indices(picked.unsqueeze(1), n_keys=n_keys, init=init, local=local,
                                            kv_start=kv_start, n_valid=n_valid)
        picked = torch.where(hit.view(-1, 1), cached, picked)
        last = query_positions(n_keys, 1, n_valid=n_valid, device=votes.device).view(1)
        made = torch.where(hit, anchor_pos.long(), last)
        return picked, assemble_indices(picked.unsqueeze(1), n_keys=n_keys, init=init, local=local,
                                        kv_start=kv_start, recent_start=(made - local + 1).view(-1, 1),
                                        recent_width=int(local) + int(extra), n_valid=n_valid)
    from .token_select_onepass import build_list_triton

    # unsorted: the k winners' order matters to no one (the list is a set), and sorting 2048 of them is a launch;
    # the radix select leaves the hits' rows unwritten, which the list kernel does not read for them
    top = min(int(k_select), n_keys)
    if TOPK == "radix" and top >= 1:
        from .topk_rows import topk_rows

        val, idx = topk_rows(votes, top, skip=hit)
    else:
        val, idx = torch.topk(votes, top, dim=-1, sorted=False)
    return build_list_triton(val, idx, n_keys=n_keys, k_select=k_select, init=init, local=local, kv_start=kv_start,
                             hit=hit, cached=cached, anchor_pos=anchor_pos, extra=extra if hit is not None else 0,
                             out=out, n_valid=n_valid)


def top_candidates(votes: torch.Tensor, k_select: int) -> torch.Tensor:
    """The ``k_select`` candidates of largest vote: ``votes [batch, kv_heads, n, N]`` (or ``[batch, kv_heads, N]``)
    summed over the KV heads -> int64 ``[batch, n, min(k_select, N)]``, ``-1`` where a query has fewer candidates.
    Ties go to ``torch.topk``."""
    if votes.dim() == 3:
        votes = votes.unsqueeze(2)
    total = votes.sum(1)  # [B, n, N]; -inf stays -inf outside the candidates
    val, idx = torch.topk(total, min(int(k_select), total.shape[-1]), dim=-1)
    return torch.where(torch.isfinite(val), idx, -1)


def assemble_indices(picked: torch.Tensor, *, n_keys: int, init: int, local: int,
                     kv_start: torch.Tensor | None = None, recent_start: torch.Tensor | None = None,
                     recent_width: int | None = None, n_valid: torch.Tensor | None = None) -> torch.Tensor:
    """The keys each query attends to: the candidates ``picked [batch, n, k]`` (``-1`` = none) plus the kept ones,
    ``[batch, n, S]`` int32, ascending, ``-1`` = unused slot (``S = init + k + local`` without ``recent_start``).

    Query ``i`` sits at key index ``p = n_keys - n + i``; init keys are ``[s, s + init)`` up to the query, recent
    ones ``(p - local, p]`` from ``s + init`` on, so no key is listed twice. ``recent_start [batch, n]`` moves the
    start of the recent keys earlier (a reused selection keeps the local window it was made with, see
    :mod:`lighttransfer.runtime.token_select`); the recent block is then as wide as the widest query needs (found
    on the host), or ``recent_width`` slots when given (a static shape, no synchronization; the caller bounds the
    width needed by it, keys past it would be dropped). ``n_valid`` (int ``[1]`` on the device): only the first
    ``n_valid`` of ``n_keys`` keys exist, query ``i`` sits at ``n_valid - n + i``."""
    batch, n, _ = picked.shape
    device = picked.device
    start = torch.zeros(batch, dtype=torch.long, device=device) if kv_start is None \
        else kv_start.to(device=device, dtype=torch.long)
    pos = query_positions(n_keys, n, n_valid=n_valid, device=device).view(1, n, 1)  # [1, n, 1]
    parts = [picked.long()]
    if init > 0:
        first = start.view(batch, 1, 1) + torch.arange(init, device=device).view(1, 1, init)
        parts.append(torch.where(first <= pos, first, -1).expand(batch, n, init))
    lo = (pos - local + 1).expand(batch, n, 1) if recent_start is None else \
        torch.minimum(recent_start.to(device=device, dtype=torch.long).view(batch, n, 1), pos - local + 1)
    # a fresh selection's recent block is exactly ``local`` wide (known on the host: no synchronization, so the
    # list can be built inside a CUDA graph); a reused one's is as wide as its widest query needs
    if recent_width is not None:
        width = int(recent_width)
    else:
        width = int(local) if recent_start is None else (int((pos - lo + 1).max()) if lo.numel() else 0)
    if width > 0:
        near = lo + torch.arange(width, device=device).view(1, 1, width)
        floor = (start + init).view(batch, 1, 1)  # below it the key is an init key (or padding)
        parts.append(torch.where((near >= floor) & (near <= pos), near, -1))
    return torch.cat(parts, dim=-1).sort(dim=-1).values.to(torch.int32)


def select_indices(votes: torch.Tensor, *, k_select: int, init: int, local: int,
                   kv_start: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`top_candidates` then :func:`assemble_indices`: ``votes [batch, kv_heads, n, N]`` (or
    ``[batch, kv_heads, N]`` for one query) -> ``[batch, n, init + k + local]`` int32 (``-1`` = unused slot)."""
    picked = top_candidates(votes, k_select)
    return assemble_indices(picked, n_keys=votes.shape[-1], init=init, local=local, kv_start=kv_start)


def select_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, *,
                               scale: float | None = None) -> torch.Tensor:
    """Attention of ``q [B, H, n, D]`` over the keys ``indices [B, n, S]`` (``-1`` = unused) of ``k, v
    [B, Hkv, N, D]``, in float32; returns ``[B, H, n, D]`` in ``q.dtype`` (zeros for a query with no index)."""
    batch, heads, n, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    out = torch.zeros(batch, heads, n, v.shape[-1], dtype=torch.float32, device=q.device)
    for a in range(0, n, REFERENCE_QUERY_BLOCK):
        b_ = min(n, a + REFERENCE_QUERY_BLOCK)
        idx = indices[:, a:b_].long()  # [B, nb, S]
        ok = idx >= 0
        flat = idx.clamp(min=0).reshape(batch, 1, -1, 1)  # [B, 1, nb*S, 1]
        # gathered first, then cast: only the listed rows are ever copied to float32
        ks = k.gather(2, flat.expand(batch, kv_heads, flat.shape[2], dim)).float().view(batch, kv_heads, b_ - a,
                                                                                         -1, dim)
        vs = v.gather(2, flat.expand(batch, kv_heads, flat.shape[2], v.shape[-1])).float().view(
            batch, kv_heads, b_ - a, -1, v.shape[-1])
        qg = q[:, :, a:b_].float().view(batch, kv_heads, group, b_ - a, dim)
        s = torch.einsum("bgqnd,bgnsd->bgqns", qg, ks) * scale  # [B, Hkv, G, nb, S]
        s = s.masked_fill(~ok.view(batch, 1, 1, b_ - a, -1), float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        o = torch.einsum("bgqns,bgnsd->bgqnd", p, vs)
        out[:, :, a:b_] = o.reshape(batch, heads, b_ - a, -1)
    return out.to(q.dtype)


def select_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, *,
                     scale: float | None = None, splits: int | None = None) -> torch.Tensor:
    """Attention of ``q [B, H, n, D]`` over the keys listed per sequence and query in ``indices [B, n, S]`` (int32
    or int64, ``-1`` = unused slot; any order, no duplicates) of ``k, v [B, Hkv, N, D]`` (any strides with a
    contiguous last dim: views of the full layer's storage). Keys are gathered by index; GQA reads each gathered
    K/V row once per KV head for all its query heads, never repeated in memory.

    Returns ``o [B, H, n, D]`` in ``q.dtype`` (zeros for a query whose list is empty). Triton on CUDA (split-K over
    the index list, partials merged by log-sum-exp with the decode merge kernel), the reference elsewhere.
    """
    check_qkv("select_attention", q, k, v)
    batch, _, n, _ = q.shape
    if indices.dim() != 3 or indices.shape[0] != batch or indices.shape[1] != n:
        raise LightTransferError(f"select_attention: indices must be [batch, n, S] = [{batch}, {n}, S], got "
                                 f"{tuple(indices.shape)}.")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not triton_runs_on(q):
        return select_attention_reference(q, k, v, indices, scale=scale)
    check_triton_support("select_attention", q)
    from .token_select_triton import select_attention_triton

    return select_attention_triton(q, k, v, indices, scale=scale, splits=splits)


def _check_counts(name: str, *, init: int, local: int) -> None:
    if init < 0 or local < 0:
        raise LightTransferError(f"{name}: init and local must be >= 0, got init={init}, local={local}.")


def _check_valid(name: str, n_valid) -> None:
    if n_valid is not None and (n_valid.numel() != 1 or n_valid.dtype not in (torch.int32, torch.int64)):
        raise LightTransferError(f"{name}: n_valid must be one int32/int64 live length, got "
                                 f"{tuple(n_valid.shape)} {n_valid.dtype}.")


def _check_start(name: str, kv_start, batch: int) -> None:
    if kv_start is not None and tuple(kv_start.shape) != (batch,):
        raise LightTransferError(f"{name}: kv_start must be [batch] = [{batch}], got {tuple(kv_start.shape)}.")


__all__ = ["token_votes", "total_votes", "fresh_selection", "token_votes_reference", "select_indices", "top_candidates", "assemble_indices", "select_attention",
           "select_attention_reference", "candidate_bounds", "query_positions", "REFERENCE_QUERY_BLOCK"]
