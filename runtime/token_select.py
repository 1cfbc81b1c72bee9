"""TokenSelect decode for the full layers: the rule of :mod:`lighttransfer.kernels.token_select` with the paper's
Selection Cache, per layer and sequence.

What one call does (a full layer, ``n`` queries after cached keys: ``n = 1`` at decode, more for a continuation
chunk when the cache selects in chunks (``select_chunks``, what evaluation turns on), where every query selects
as it would have been decoded alone, so teacher-forced scoring equals greedy decoding; without it a chunk after
the prefill, as in chunked prefill, attends densely):

1. When every candidate fits the budget (``init + k + local`` covers the longest sequence's keys), the selection
   would be everything: the caller attends densely (the same attention, without the scoring).
2. Selection Cache (Wu et al., arXiv 2411.02886, Sec. 3.3): a sequence reuses its cached top-``k`` while the cosine
   similarity between its query (all heads' post-RoPE query vectors, one vector per sequence) and the *anchor*
   query, the one the cached selection was computed from, is at least ``reuse``. Comparing with the anchor rather
   than with the previous step's query keeps a slow drift from carrying a stale selection on indefinitely. A miss
   scores the candidates (soft vote, top-``k``) and makes this query the anchor. ``reuse_against="previous"`` takes
   the paper's consecutive-query rule instead: the query is compared with the previous step's (so the compared
   query moves at every step, hit or miss), and only the age bound below ends a slowly drifting reuse.
3. Reusing a selection reuses all of it: the anchor's top-``k``, the ``init`` first tokens, and the anchor's
   local window, which the tokens that came since extend to the current query: ``(anchor - local, now]``. (Keeping
   only the current local window would silently drop the tokens that left it since the anchor, which were part of
   the reused selection; this way a budget that covers every candidate stays exact with the cache on.) Attention
   then runs over the listed keys only (``kernels.select_attention``).

4. A reused selection serves at most ``reuse_max_age`` steps: a query more than that many keys after its anchor
   rescores even when similar (a miss). This bounds the reused recent block, ``local + age`` keys, so a decode
   step's list has the static width ``init + k + local + reuse_max_age``.

In a batch, the vote kernel scores only the sequences that missed (on the CPU, the reference scores the whole
batch and the hits keep their cached selection); the hit rate counts sequences. A decode step (one query, the
kernels) is one fixed sequence of launches with no host synchronization, so a CUDA graph can capture it: without a
usable Selection Cache (the first after the prefill, or every step with ``reuse = 1``) the one-pass vote,
``torch.topk``, the list kernel and attention (:func:`_fresh_step`); with one, the hit flags on the device, the
vote skipping the hits' programs, the list kernel keeping their cached picks, attention, and the state updated in
place (:func:`_cached_step`; the hit flags, the anchors' update and the counts are one launch,
:func:`kernels.selection_lookup`). The general path below (continuation chunks, the CPU references) decides hits
on the host; it is the reference semantics, and the decode steps give the same selections (tested).

Static decode steps (:meth:`~lighttransfer.runtime.cache.HybridCache.begin_static`, what one CUDA graph replays at
every length): ``k, v`` are the full layer's whole reserved storage and ``n_valid`` (int ``[1]`` on the device)
its live length; the decode steps above then read the query's key index and every bound from it, never from a
shape, and run on every device (the kernel entry points fall back to the references off CUDA). A static step
never takes the dense shortcut of 1. (a graph cannot branch on the length; where the budget covers every
candidate the list is every key, the same attention). With the Selection Cache on, every static step is the
cached step: from a cold state (:meth:`SelectionState.make_cold`, or :meth:`SelectionState.invalidate` in place
at ``begin_static``) every sequence misses, which selects as the fresh step does.
State is on the cache (:class:`SelectionState` per full layer); counts go to a :class:`SelectionStats` that the
model's runtime shares across its caches.
"""

from __future__ import annotations

import contextlib

import torch

from .. import kernels
from ..errors import LightTransferError
from ..hybrid_format import TokenSelectConfig
from ..kernels.page_select import page_picks_reference

# queries scored together by the CPU reference in a continuation chunk (bounds its [block, N] votes)
VOTE_BLOCK = 64
# attend densely when the budget covers every candidate (the same attention); tests turn it off to run the
# selection path on everything
DENSE_WHEN_COVERED = True
# CPU tensors: False = the PyTorch references (the default: the Triton interpreter is far too slow for a model),
# True = the kernel entry points (under TRITON_INTERPRET=1, the CUDA path's wiring, for tests)
KERNELS_ON_CPU = False
# the decode steps without host synchronization (n = 1, kernels): False sends them through the general path (the
# reference semantics, deciding hits on the host); tests compare the two
DEVICE_STEPS = True
# the cached step's Selection Cache lookup in one launch (kernels.selection_lookup); False: the same as separate
# torch ops (the kernel benchmark's baseline)
FUSED_LOOKUP = True


def _use_kernels(q: torch.Tensor) -> bool:
    return (q.is_cuda or KERNELS_ON_CPU) and not kernels.reference_forced()


class SelectionStats:
    """Counts of TokenSelect's decisions, summed over full layers, sequences and queries.

    Counts made by the host (:meth:`add`) are Python ints; the decode step with the Selection Cache adds its own on
    the device (:meth:`add_on_device`, an int64 ``[2]`` counter per device, so that the step needs no host
    synchronization and a CUDA graph replaying it keeps counting). Reading a count synchronizes, once.

    Attributes (read-only):
        lookups: selections needed (one per full layer, sequence and query past the prefill, when the budget did
            not cover every candidate).
        hits: of those, reused from the Selection Cache.
        dense: queries attended densely because the budget covered every candidate.
    """

    def __init__(self) -> None:
        self._lookups = self._hits = self._dense = 0
        self.counts: dict[torch.device, torch.Tensor] = {}  # device -> int64 [2]: (lookups, hits)

    def add(self, *, lookups: int = 0, hits: int = 0, dense: int = 0) -> None:
        self._lookups += int(lookups)
        self._hits += int(hits)
        self._dense += int(dense)

    def counter(self, device: torch.device) -> torch.Tensor:
        """The int64 ``[2]`` counter of ``device`` (made on first use). Static decode steps make it before a
        capture: made inside one, its zeroing would be recorded and replayed every step."""
        device = torch.device(device)
        c = self.counts.get(device)
        if c is None:
            c = self.counts[device] = torch.zeros(2, dtype=torch.long, device=device)
        return c

    def add_on_device(self, lookups: int, hit: torch.Tensor) -> None:
        """Count ``lookups`` selections of which ``hit`` (bool ``[B]``) were reused, on ``hit``'s device."""
        c = self.counter(hit.device)
        c[0] += int(lookups)
        c[1] += hit.sum()

    def _device_counts(self) -> tuple[int, int]:
        totals = [c.tolist() for c in self.counts.values()]
        return sum(t[0] for t in totals), sum(t[1] for t in totals)

    @property
    def lookups(self) -> int:
        return self._lookups + self._device_counts()[0]

    @property
    def hits(self) -> int:
        return self._hits + self._device_counts()[1]

    @property
    def dense(self) -> int:
        return self._dense

    @property
    def hit_rate(self) -> float:
        """``hits / lookups`` (0 before any lookup)."""
        lookups, hits = self._device_counts()
        lookups, hits = lookups + self._lookups, hits + self._hits
        return hits / lookups if lookups else 0.0

    def reset(self) -> None:
        """Zero every count; the device counters in place (a captured decode step keeps adding to the same
        tensors; they are made during an inference-mode forward, and such tensors change only inside it)."""
        self._lookups = self._hits = self._dense = 0
        with torch.inference_mode():
            for c in self.counts.values():
                c.zero_()

    def __repr__(self) -> str:
        return f"SelectionStats(lookups={self.lookups}, hits={self.hits}, dense={self.dense})"

    def to_dict(self) -> dict:
        return {"lookups": self.lookups, "hits": self.hits, "dense": self.dense, "hit_rate": self.hit_rate}


class SelectionState:
    """One full layer's Selection Cache: per sequence, the query the next one is compared with ``[batch, heads *
    head_dim]`` float32 (``anchor``: the query the cached selection was made with, or with ``reuse_against=
    "previous"`` the previous step's), the cached top-``k`` ``[batch, k]`` int64 (``-1`` = unused) and the key index
    it was made at ``[batch]`` int64, or nothing yet."""

    def __init__(self) -> None:
        self.anchor: torch.Tensor | None = None
        self.picked: torch.Tensor | None = None
        self.anchor_pos: torch.Tensor | None = None

    def clear(self) -> None:
        self.anchor = self.picked = self.anchor_pos = None

    def usable(self, batch: int, k: int) -> bool:
        return self.anchor is not None and self.anchor.shape[0] == batch and self.picked.shape[-1] == k

    def make_cold(self, batch: int, width: int, k: int, device) -> None:
        """New tensors in the state :meth:`invalidate` leaves (every next lookup a miss): anchors ``[batch,
        width]``, ``k`` picks per sequence."""
        self.anchor = torch.zeros(batch, width, dtype=torch.float32, device=device)
        self.picked = torch.full((batch, k), -1, dtype=torch.long, device=device)
        self.anchor_pos = torch.full((batch,), -(1 << 40), dtype=torch.long, device=device)

    def invalidate(self) -> None:
        """Make every sequence's next lookup a miss, in place (the tensors a captured step reads stay): the anchor
        query is zeroed (cosine similarity 0) and its key index pushed far into the past (older than any
        ``reuse_max_age``)."""
        if self.anchor is None:
            return
        with torch.inference_mode():
            self.anchor.zero_()
            self.anchor_pos.fill_(-(1 << 40))
            self.picked.fill_(-1)


def token_select_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, config: TokenSelectConfig,
                           state: SelectionState, stats: SelectionStats | None, kv_start: torch.Tensor | None,
                           scale: float | None, n_valid: torch.Tensor | None = None) -> torch.Tensor | None:
    """TokenSelect attention of ``q [B, H, n, D]`` (the last ``n`` of the keys) over ``k, v [B, Hkv, N, D]``;
    returns ``[B, H, n, D]``, or ``None`` when the budget covers every candidate (attend densely then).

    ``kv_start``: int ``[B]`` left padding (keys before it are not attended; the init tokens start there).
    ``n_valid``: a static step (one query): ``k, v`` are the whole storage, of which the first ``n_valid`` (int
    ``[1]`` on the device) keys exist; nothing is read on the host and the result is never ``None``.
    """
    batch, heads, n, dim = q.shape
    n_keys = k.shape[2]
    scale = dim ** -0.5 if scale is None else float(scale)
    pages = config.score == "pages"  # the Quest-like baseline: the general path, PyTorch scoring
    if n_valid is not None:
        if pages:
            raise LightTransferError("the page-bound (Quest-like) selection runs on dynamic decode steps only; "
                                     "leave out cuda_graphs / --cuda-graphs.")
        if n != 1:
            raise ValueError(f"a static TokenSelect step takes one query per sequence, got {n}")
        # with the Selection Cache, always the cached step (all misses from a cold state: the fresh step's
        # selections), so the eager warm-up before a capture runs (and compiles) what the graph records
        if config.cache_enabled and not state.usable(batch, config.k):
            state.make_cold(batch, heads * dim, config.k, q.device)
        step = _cached_step if config.cache_enabled else _fresh_step
        # the kernel entry points; on CPU tensors their references unless KERNELS_ON_CPU (as the general path)
        with contextlib.nullcontext() if _use_kernels(q) else kernels.use_reference():
            return step(q, k, v, config=config, state=state, stats=stats, kv_start=kv_start, scale=scale,
                        n_valid=n_valid)
    start = torch.zeros(batch, dtype=torch.long, device=q.device) if kv_start is None \
        else kv_start.to(device=q.device, dtype=torch.long)
    # candidates of the last query of an unpadded sequence: known on the host, no synchronization (left padding
    # only shortens a sequence, and a budget covering all of its candidates selects exactly the dense keys)
    most = n_keys - config.local - config.init
    if most <= config.k and DENSE_WHEN_COVERED:
        state.clear()
        if stats is not None:
            stats.add(dense=batch * n)
        return None
    if n == 1 and _use_kernels(q) and DEVICE_STEPS and not pages:
        if config.cache_enabled and state.usable(batch, config.k):
            return _cached_step(q, k, v, config=config, state=state, stats=stats, kv_start=kv_start, scale=scale)
        return _fresh_step(q, k, v, config=config, state=state, stats=stats, kv_start=kv_start, scale=scale)

    picked = torch.empty(batch, n, config.k, dtype=torch.long, device=q.device)
    recent = torch.empty(batch, n, dtype=torch.long, device=q.device)  # where each query's recent keys start
    flat = q.transpose(1, 2).reshape(batch, n, heads * dim).float()  # [B, n, H*D]
    usable = state.usable(batch, config.k)
    anchor = state.anchor if usable else None
    made = state.anchor_pos if usable else None  # the anchors' key indices
    previous = config.reuse_against == "previous"
    needs_votes, hits = [], []
    for i in range(n):
        if anchor is None or not config.cache_enabled:
            hit = torch.zeros(batch, dtype=torch.bool, device=q.device)
        else:
            hit = _hits(flat[:, i], anchor, made, n_keys - n + i, config)
        hits.append(hit)
        every = bool(hit.all())
        if previous or not every:  # the query the next one is compared with
            anchor = flat[:, i] if anchor is None or previous else torch.where(hit[:, None], anchor, flat[:, i])
        if not every:
            needs_votes.append(i)
            made = torch.full((batch,), n_keys - n + i, dtype=torch.long, device=q.device) if made is None \
                else torch.where(hit, made, n_keys - n + i)
    fresh = _fresh_picks(q, k, {i: ~hits[i] for i in needs_votes}, config=config, kv_start=kv_start, scale=scale)
    prev = state.picked if usable else None
    prev_pos = state.anchor_pos if usable else None
    for i in range(n):
        pos = n_keys - n + i
        if i in fresh:
            now = torch.full((batch,), pos, dtype=torch.long, device=q.device)
            rows, picks = fresh[i]
            if rows is None:
                cur = picks if prev is None else torch.where(hits[i][:, None], prev, picks)
            else:  # only the sequences that missed were scored
                cur = prev.clone()
                cur[rows] = picks
            cur_pos = now if prev_pos is None else torch.where(hits[i], prev_pos, now)
        else:
            cur, cur_pos = prev, prev_pos
        picked[:, i] = cur
        # a reused selection keeps the recent keys it was made with: (anchor - local, now]
        recent[:, i] = cur_pos - config.local + 1
        prev, prev_pos = cur, cur_pos
    # the state owns its storage (no view of q or of a block of picks): the device step updates it in place
    state.anchor, state.picked, state.anchor_pos = anchor.clone(), prev.clone(memory_format=torch.contiguous_format), \
        prev_pos.clone()
    if stats is not None:
        stats.add(lookups=batch * n, hits=int(torch.stack(hits).sum()))
    indices = kernels.assemble_indices(picked, n_keys=n_keys, init=config.init, local=config.local, kv_start=start,
                                       recent_start=recent)
    if _use_kernels(q):
        return kernels.select_attention(q, k, v, indices, scale=scale)
    return kernels.select_attention_reference(q, k, v, indices, scale=scale)


def _query_index(n_keys: int, batch: int, n_valid, device) -> torch.Tensor:
    """int64 ``[B]``: the key index of a decode step's query (``n_keys - 1``, or ``n_valid - 1`` on the device)."""
    return kernels.query_positions(n_keys, 1, n_valid=n_valid, device=device).view(1).expand(batch)


def _fresh_step(q, k, v, *, config: TokenSelectConfig, state: SelectionState, stats: SelectionStats | None,
                kv_start, scale, n_valid=None) -> torch.Tensor:
    """A decode step that scores every sequence (no usable Selection Cache): one-pass votes, top-k and the list in
    one launch, attention over it. No host synchronization, so a CUDA graph can capture it."""
    batch, n_keys = q.shape[0], k.shape[2]
    votes = kernels.total_votes(q, k, init=config.init, local=config.local, kv_start=kv_start, scale=scale,
                                n_valid=n_valid)
    picked, indices = kernels.fresh_selection(votes, k_select=config.k, init=config.init, local=config.local,
                                              kv_start=kv_start, n_valid=n_valid)
    # this query becomes every sequence's anchor (the state the reference path leaves, cache on or off)
    state.anchor = q.transpose(1, 2).reshape(batch, -1).float().clone()  # owned: updated in place later
    state.picked = picked
    state.anchor_pos = _query_index(n_keys, batch, n_valid, q.device).clone()
    if stats is not None and n_valid is not None:  # a static step may be replayed: count on the device
        stats.add_on_device(batch, torch.zeros(batch, dtype=torch.bool, device=q.device))
    elif stats is not None:
        stats.add(lookups=batch)
    return kernels.select_attention(q, k, v, indices, scale=scale)


def _hits(query: torch.Tensor, anchor: torch.Tensor, made: torch.Tensor, pos: int | torch.Tensor,
          config: TokenSelectConfig) -> torch.Tensor:
    """Bool ``[B]``: the sequences whose query ``[B, H*D]`` float32 at key index ``pos`` (an int or ``[B]``) reuses the selection of
    ``anchor [B, H*D]`` made at key indices ``made [B]``: similar enough (cosine ``>= reuse``, or as
    ``config.force_reuse`` forces it) and not older than ``reuse_max_age`` steps. On the device, no
    synchronization."""
    if config.force_reuse is None:
        similar = torch.nn.functional.cosine_similarity(query, anchor, dim=-1) >= config.reuse
    else:  # a benchmark's forced decision (random weights): the age bound still holds
        similar = torch.full(made.shape, config.force_reuse, dtype=torch.bool, device=made.device)
    return similar & (pos - made <= config.reuse_max_age)


def _cached_step(q, k, v, *, config: TokenSelectConfig, state: SelectionState, stats: SelectionStats | None,
                 kv_start, scale, n_valid=None) -> torch.Tensor:
    """A decode step with a usable Selection Cache, hits and misses decided per sequence on the device: the vote
    kernel skips the sequences that hit, the list kernel keeps their cached top-k and their anchor's recent keys
    (a list of the static width ``init + k + local + reuse_max_age``), and the state is updated in place. The same
    selections as the general path above, with no host synchronization, so a CUDA graph can capture it (and
    replay it: it reads and writes the same state tensors every step)."""
    n_keys = k.shape[2]
    # hit flags, the misses' anchors moved to this query and the counts (a hit keeps its anchor_pos, which is what
    # the list below reads for it)
    if FUSED_LOOKUP:
        hit = kernels.selection_lookup(q, state.anchor, state.anchor_pos, n_keys - 1 if n_valid is None else None,
                                       reuse=config.reuse, max_age=config.reuse_max_age, force=config.force_reuse,
                                       counter=None if stats is None else stats.counter(q.device), n_valid=n_valid,
                                       previous=config.reuse_against == "previous")
    else:
        hit = _lookup_in_steps(q, state, n_keys, n_valid, config, stats)
    votes = kernels.total_votes(q, k, init=config.init, local=config.local, kv_start=kv_start, scale=scale,
                                skip=hit, n_valid=n_valid)
    picked, indices = kernels.fresh_selection(votes, k_select=config.k, init=config.init, local=config.local,
                                              kv_start=kv_start, hit=hit, cached=state.picked,
                                              anchor_pos=state.anchor_pos, extra=config.reuse_max_age,
                                              out=state.picked, n_valid=n_valid)
    if picked is not state.picked:  # the reference's result (CPU): into the same storage all the same
        state.picked.copy_(picked)
    return kernels.select_attention(q, k, v, indices, scale=scale)


def _lookup_in_steps(q, state: SelectionState, n_keys: int, n_valid, config: TokenSelectConfig,
                     stats: SelectionStats | None) -> torch.Tensor:
    """:func:`kernels.selection_lookup` as separate torch ops (about fourteen launches instead of one): the
    baseline the kernel benchmark times it against (``FUSED_LOOKUP = False``)."""
    batch = q.shape[0]
    pos = n_keys - 1 if n_valid is None else _query_index(n_keys, batch, n_valid, q.device)
    query = q.transpose(1, 2).reshape(batch, 1, -1).float()[:, 0]  # [B, H*D], as the general path's
    hit = _hits(query, state.anchor, state.anchor_pos, pos, config)
    state.anchor.copy_(query if config.reuse_against == "previous" else torch.where(hit[:, None], state.anchor, query))
    state.anchor_pos.copy_(torch.where(hit, state.anchor_pos, pos))
    if stats is not None:
        stats.add_on_device(batch, hit)
    return hit


def _fresh_picks(q, k, misses: dict[int, torch.Tensor], *, config: TokenSelectConfig, kv_start,
                 scale) -> dict[int, tuple[torch.Tensor | None, torch.Tensor]]:
    """``{query row: (sequences scored or None for all, their top-k [B or R, k] int64)}`` for the query rows that
    need scoring (``misses[i]``: bool ``[B]``, the sequences whose Selection Cache missed); each row only sees the
    keys up to its own position (query ``i`` of ``n`` sits at key index ``N - n + i``). The vote kernel scores
    just the sequences that missed; the CPU reference scores blocks of queries for the whole batch."""
    if not misses:
        return {}
    n, n_keys = q.shape[2], k.shape[2]
    out: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
    if config.score == "pages":  # the Quest-like baseline scores every sequence (PyTorch, any device)
        for a in range(0, n, VOTE_BLOCK):
            block = [i for i in misses if a <= i < a + VOTE_BLOCK]
            if not block:
                continue
            hi = block[-1] + 1
            picks = page_picks_reference(q[:, :, a:hi], k[:, :, :n_keys - n + hi], init=config.init,
                                         local=config.local, k_select=config.k, page=config.page,
                                         kv_start=kv_start, scale=scale)
            for i in block:
                out[i] = (None, picks[:, i - a])
        return out
    if _use_kernels(q):
        for i, miss in misses.items():  # the vote kernel takes one query per sequence: its keys end at its own
            end = n_keys - n + i + 1
            rows = None if bool(miss.all()) else miss.nonzero().squeeze(1)
            votes = kernels.total_votes(q[:, :, i:i + 1], k[:, :, :end], init=config.init, local=config.local,
                                        kv_start=kv_start, scale=scale, rows=rows)
            start = kv_start if kv_start is None or rows is None else kv_start.to(q.device).index_select(0, rows)
            picks, _ = kernels.fresh_selection(votes, k_select=config.k, init=config.init, local=config.local,
                                               kv_start=start)
            out[i] = (rows, picks)
        return out
    wanted = list(misses)
    for a in range(0, len(wanted), VOTE_BLOCK):
        block = wanted[a:a + VOTE_BLOCK]
        lo, hi = block[0], block[-1] + 1
        end = n_keys - n + hi
        votes = kernels.token_votes_reference(q[:, :, lo:hi], k[:, :, :end], init=config.init, local=config.local,
                                              kv_start=kv_start, scale=scale)
        tops = _pad_picks(kernels.top_candidates(votes, config.k), config.k)  # [B, hi - lo, k]
        for i in block:
            out[i] = (None, tops[:, i - lo])
    return out


def _pad_picks(picked: torch.Tensor, k: int) -> torch.Tensor:
    """Right-pad the last dim to ``k`` with ``-1`` (a query whose keys number fewer than ``k``)."""
    short = k - picked.shape[-1]
    if short <= 0:
        return picked
    return torch.nn.functional.pad(picked, (0, short), value=-1)


__all__ = ["token_select_attention", "SelectionState", "SelectionStats", "VOTE_BLOCK"]
