"""Head routing of the full layers at decode: per query and KV head, sink + window of the full cache or every key.

With ``lighttransfer.load(..., head_routing="qada")`` (or a ``head_routing`` entry in the checkpoint block), a full
layer's decode step (one query per sequence after cached keys; and, when the runtime's ``select_chunks`` is on, each
query of a continuation chunk as if decoded alone) runs:

1. the key moments move (``qada`` only): per (sequence, KV head), ``stats="bulk"`` holds the keys ``[kv_start +
   sink, n - window)``, so each step adds the one key that left the window (the first step after the prefill adds
   the prompt's whole bulk once); ``stats="local"`` holds the window keys past the sinks, so each step adds the new
   key and removes the one that left;
2. the decision (:mod:`lighttransfer.kernels.head_routing`): ``qada`` predicts each query head's far share from
   the local keys' exact scores and the Gaussian of the moments; ``oracle`` computes it exactly; a KV head goes
   local when all its query heads are at or below the layer's ``tau``. With ``guard="pages"`` (``qada``) the
   page bounds of the bulk keys (:mod:`lighttransfer.kernels.routing_guard`) move with it, and each query head's
   share is ``max(f̂, g)``, ``g`` the largest share one page could take at its score bound (a needle the Gaussian
   misses). With ``guard="heads"`` the KV heads of ``full_masks`` have an infinite far share: always full, and
   counted so by the calibration. ``random`` draws local with probability ``share``; ``static`` applies fixed
   per-layer masks;
3. attention: :func:`lighttransfer.kernels.routed_decode` (the Triton kernel on CUDA, the reference on the CPU).

On CUDA, ``qada`` with bulk moments and no guard runs 1-3 fused on the device instead (:mod:`.head_routing_fused`).

The moments live on the cache (:class:`RoutingState` per full layer, in ``HybridCache.routing_states``); a cache
whose key count went down (``crop``) or whose batch changed starts its moments again from the keys it holds.
Realised shares go to :class:`RoutingStats` (device counters, read only when asked), which the model's runtime keeps.
Prefill forwards (and chunks, unless ``select_chunks``) attend densely.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import kernels
from ..hybrid_format import HeadRoutingConfig
from ..kernels import head_routing as rule
from ..kernels import routing_guard as guard
from . import head_routing_fused as fused

# CPU tensors: False = the reference (the default), True = the kernel entry point (TRITON_INTERPRET=1 tests)
KERNELS_ON_CPU = False


@dataclass
class RoutingStats:
    """Realised routing, per full layer: (sequence, KV head) decisions with a non-empty bulk and how many went
    local. Counters stay on the device until read. ``record``: also keep every decision's largest far share over
    the KV head's query heads (``[steps x sequences, kv_heads]`` float32 per layer, on the host; for
    :func:`~lighttransfer.runtime.calibrate_head_routing`)."""

    record: bool = False
    counts: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [2] float64: (local, decided)
    shares: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def add(self, layer: int, local: torch.Tensor, decided: torch.Tensor, share: torch.Tensor | None) -> None:
        c = self.counter(layer, local.device)
        c[0] += (local & decided).sum()
        c[1] += decided.sum()
        if self.record and share is not None:
            self.shares.setdefault(layer, []).append(share[decided[:, 0]].float().cpu())  # [sequences, kv_heads]

    def counter(self, layer: int, device) -> torch.Tensor:
        """The layer's counts ``[2]`` float64 (local, decided) on ``device``, made at first use (the fused step
        adds to them on the device)."""
        c = self.counts.get(layer)
        if c is None:
            c = self.counts[layer] = torch.zeros(2, dtype=torch.float64, device=device)
        return c

    def has_decisions(self) -> bool:
        return any(c[1].item() > 0 for c in self.counts.values())

    def local_share_by_layer(self) -> dict[int, float]:
        """ρ per layer: the share of decisions routed local (layers without a decision absent)."""
        out = {}
        for layer, c in sorted(self.counts.items()):
            local, decided = c.tolist()
            if decided:
                out[layer] = local / decided
        return out

    def local_share(self) -> float | None:
        """ρ over every layer's decisions (``None`` before any)."""
        total = [c.tolist() for c in self.counts.values()]
        decided = sum(t[1] for t in total)
        return sum(t[0] for t in total) / decided if decided else None

    def reset(self) -> None:
        """Zero the counts in place (a captured decode step keeps adding to the same tensors). The counts are made
        during an inference-mode forward, and such tensors change only inside inference mode."""
        with torch.inference_mode():
            for c in self.counts.values():
                c.zero_()
        self.shares.clear()

    def to_dict(self) -> dict:
        decided = int(sum(c[1].item() for c in self.counts.values()))
        if not decided:
            return {"local_share": None, "decisions": 0, "by_layer": {}}
        return {"local_share": self.local_share(), "decisions": decided,
                "by_layer": {str(k): v for k, v in self.local_share_by_layer().items()}}


class RoutingState:
    """One full layer's key moments (``qada``): :class:`~lighttransfer.kernels.head_routing.KeyMoments` over the
    key-index range ``(lo, hi)``, for a batch and a key count; with the ``pages`` guard also the page bounds
    (:class:`~lighttransfer.kernels.routing_guard.PageBounds`) of the bulk keys ``[kv_start + sink, page_hi)``.
    During static decode steps both move on the device only (one key per step) and :attr:`range` and
    :attr:`page_hi` are ``None`` on the host until they are rebuilt."""

    def __init__(self) -> None:
        self.moments: rule.KeyMoments | None = None
        self.range: tuple[int, int] | None = (0, 0)
        self.keys = 0
        self.pages: guard.PageBounds | None = None
        self.page_hi: int | None = 0
        self.fused = None  # the fused step's counters (runtime/head_routing_fused.py), made at its first step

    def prepare(self, k: torch.Tensor, *, diagonal: bool, n_keys: int, page: int | None = None) -> None:
        """Moments (and, with ``page``, page bounds with room for ``n_keys`` keys) that the next move extends:
        emptied for a new batch shape or a new sequence (fewer keys than before)."""
        batch, kv_heads, _, dim = k.shape
        m = self.moments
        if m is None or m.first.shape != (batch, kv_heads, dim) or m.diagonal != diagonal or n_keys < self.keys \
                or self.range is None:
            self.zero(batch, kv_heads, dim, diagonal=diagonal, device=k.device)
        if page is not None:
            b = self.pages
            if b is None or b.kmax.shape[:2] != (batch, kv_heads) or b.kmax.shape[3] != dim or b.page != page \
                    or b.kmax.dtype != k.dtype or b.kmax.device != k.device or self.page_hi is None:
                self.pages = guard.PageBounds.empty(batch, kv_heads, guard.pages_for(n_keys, page), dim, page=page,
                                                    dtype=k.dtype, device=k.device)
                self.page_hi = 0
            else:
                self.pages.grow(guard.pages_for(n_keys, page))
        self.keys = n_keys

    def zero(self, batch: int, kv_heads: int, dim: int, *, diagonal: bool, device) -> None:
        """Empty moments, in the same tensors when their shape allows (a captured step reads those)."""
        m = self.moments
        if m is not None and m.first.shape == (batch, kv_heads, dim) and m.diagonal == diagonal \
                and m.first.device == torch.device(device):
            for t in (m.count, m.first, m.second):
                t.zero_()
        else:
            self.moments = rule.KeyMoments.zeros(batch, kv_heads, dim, diagonal=diagonal, device=device)
        self.range = (0, 0)
        self.keys = 0
        if self.pages is not None:
            self.pages.clear()
        self.page_hi = 0

    def static_pages(self, batch: int, kv_heads: int, dim: int, *, page: int, capacity: int, dtype,
                     device) -> guard.PageBounds:
        """Empty page bounds with room for ``capacity`` keys, in the same tensors when their shape allows (a
        captured step reads those)."""
        b, pages = self.pages, guard.pages_for(capacity, page)
        if b is not None and b.kmax.shape == (batch, kv_heads, pages, dim) and b.page == page \
                and b.kmax.dtype == dtype and b.kmax.device == torch.device(device):
            b.clear()
        else:
            b = self.pages = guard.PageBounds.empty(batch, kv_heads, pages, dim, page=page, dtype=dtype,
                                                    device=device)
        return b


class HeadRouting:
    """A model's head routing: its settings, the resolved sink and window, its stats and random generator."""

    def __init__(self, config: HeadRoutingConfig, *, sink: int, window: int) -> None:
        self.config = config
        self.sink = config.sink if config.sink is not None else int(sink)
        self.window = config.window if config.window is not None else int(window)
        self.stats = RoutingStats()
        # decide and record, but attend every key (calibration: the model's own activations)
        self.observe_only = False
        self._generators: dict[torch.device, torch.Generator] = {}
        self._masks: dict[tuple[str, int, torch.device], torch.Tensor] = {}

    def generator(self, device) -> torch.Generator:
        device = torch.device(device)
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device).manual_seed(self.config.seed)
        return g

    def reseed(self) -> None:
        """Start the ``random`` mode's draws again (each evaluated sequence then gets the same draws)."""
        self._generators.clear()

    def static_unsupported(self) -> str | None:
        """Why this routing cannot run inside static (CUDA-graph) decode steps, or ``None``."""
        if self.config.mode == "random":
            return "random head routing draws on the host's generator (not captured)"
        return None

    def begin_static(self, cache) -> None:
        """Before static steps: each full layer's moments cover exactly the keys that precede the next step's
        (rebuilt from the keys held, in their own tensors), so that each step moves them by one key on the
        device."""
        if self.config.mode != "qada":
            return
        from .cache import FullLayer

        kv_start = cache.sequence.kv_start
        for idx, layer in enumerate(cache.layers):
            if not isinstance(layer, FullLayer) or layer.keys is None:
                continue
            keys = layer.keys  # the `seen` tokens held
            batch, kv_heads, seen, dim = keys.shape
            state = cache.routing_states.setdefault(idx, RoutingState())
            state.zero(batch, kv_heads, dim, diagonal=self.config.cov == "diag", device=keys.device)
            start = torch.zeros(batch, dtype=torch.long, device=keys.device) if kv_start is None \
                else kv_start.to(keys.device).long()
            new = self._range(seen)
            rule.move_range(state.moments, keys, old=(0, 0), new=new, floor=start + self.sink)
            state.range = None  # moved on the device from here on
            state.keys = seen
            if self.config.guard == "pages":
                pages = state.static_pages(batch, kv_heads, dim, page=self.config.page_size,
                                           capacity=max(cache.static_tokens or seen, seen), dtype=keys.dtype,
                                           device=keys.device)
                _add_pages(pages, keys, 0, max(0, seen - self.window), floor=start + self.sink)
                state.page_hi = None

    def _range(self, n_keys: int) -> tuple[int, int]:
        """The key range the moments hold for a query that is the last of ``n_keys`` keys."""
        edge = max(0, n_keys - self.window)
        return (0, edge) if self.config.stats == "bulk" else (edge, n_keys)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layer_idx: int, state: RoutingState,
               kv_start: torch.Tensor | None, scale: float | None,
               n_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Routed attention of ``q [B, H, n, D]`` (the last ``n`` of the keys ``k, v [B, Hkv, N, D]``), each query
        decided and attended as if decoded alone; returns ``[B, H, n, D]``. ``n_valid``: a static step (one query;
        ``k, v`` are the whole storage, of which the first ``n_valid`` keys exist; nothing is read on the host)."""
        n, big_n = q.shape[2], k.shape[2]
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        start = torch.zeros(q.shape[0], dtype=torch.long, device=q.device) if kv_start is None \
            else kv_start.to(q.device).long()
        if n_valid is not None:
            st = torch.minimum(start, n_valid.long() - 1)
            out = fused.attend(self, q, k, v, layer_idx=layer_idx, state=state, kv_start=st, scale=scale,
                               n_valid=n_valid)
            if out is not None:
                return out
            local = self.decide(q, k, layer_idx=layer_idx, state=state, kv_start=st, scale=scale, n_valid=n_valid)
            if (q.is_cuda or KERNELS_ON_CPU) and not kernels.reference_forced():
                return kernels.routed_decode(q, k, v, local, sink=self.sink, window=self.window, kv_start=st,
                                             scale=scale, n_valid=n_valid)
            return kernels.routed_decode_reference(q, k, v, local, sink=self.sink, window=self.window, kv_start=st,
                                                   scale=scale, n_valid=n_valid)
        outs = []
        for i in range(n):
            end = big_n - n + i + 1
            ks, vs = k[:, :, :end], v[:, :, :end]
            st = start.clamp(max=end - 1)  # a sequence with no real key yet sees its own key
            out = fused.attend(self, q[:, :, i:i + 1], ks, vs, layer_idx=layer_idx, state=state, kv_start=st,
                               scale=scale)
            if out is not None:
                outs.append(out)
                continue
            local = self.decide(q[:, :, i:i + 1], ks, layer_idx=layer_idx, state=state, kv_start=st, scale=scale)
            if q.is_cuda or KERNELS_ON_CPU:
                if not kernels.reference_forced():
                    outs.append(kernels.routed_decode(q[:, :, i:i + 1], ks, vs, local, sink=self.sink,
                                                      window=self.window, kv_start=st, scale=scale))
                    continue
            outs.append(kernels.routed_decode_reference(q[:, :, i:i + 1], ks, vs, local, sink=self.sink,
                                                        window=self.window, kv_start=st, scale=scale))
        return outs[0] if n == 1 else torch.cat(outs, dim=2)

    def decide(self, q: torch.Tensor, k: torch.Tensor, *, layer_idx: int, state: RoutingState,
               kv_start: torch.Tensor, scale: float, n_valid: torch.Tensor | None = None) -> torch.Tensor:
        """bool ``[B, Hkv]`` routing of one query per sequence ``q [B, H, 1, D]`` (the last of ``k``'s keys, or of
        the first ``n_valid`` in a static step)."""
        cfg, sink, window = self.config, self.sink, self.window
        batch, kv_heads = k.shape[0], k.shape[1]
        n_keys = k.shape[2] if n_valid is None else n_valid
        decided = (rule.bulk_count(n_keys, kv_start, sink=sink, window=window) > 0).view(batch, 1).expand(
            batch, kv_heads)
        share = None
        if cfg.mode == "random":
            local = rule.random_local(batch, kv_heads, cfg.share, generator=self.generator(q.device), device=q.device)
        elif cfg.mode == "static":
            local = self._static_mask(layer_idx, kv_heads, q.device).view(1, kv_heads).expand(batch, kv_heads)
        else:
            if cfg.mode == "oracle":
                far = rule.exact_far_share(q, k, n_keys=n_keys, kv_start=kv_start, sink=sink, window=window,
                                           scale=scale)
            else:
                paged = cfg.guard == "pages"
                if n_valid is not None:
                    self._static_move(state, k, n_valid, floor=kv_start + sink)
                else:
                    state.prepare(k, diagonal=cfg.cov == "diag", n_keys=n_keys,
                                  page=cfg.page_size if paged else None)
                    new = self._range(n_keys)
                    new = (max(new[0], state.range[0]), max(new[1], state.range[1]))
                    rule.move_range(state.moments, k, old=state.range, new=new, floor=kv_start + sink)
                    state.range = new
                    if paged:  # the bulk's new keys join their pages (whatever the moments' source)
                        hi = max(state.page_hi, n_keys - window)
                        _add_pages(state.pages, k, state.page_hi, hi, floor=kv_start + sink)
                        state.page_hi = hi
                lse = rule.query_local_lse(q, k, n_keys=n_keys, kv_start=kv_start, sink=sink, window=window,
                                           scale=scale)
                far = rule.predicted_far_share(q, k, state.moments, n_keys=n_keys, kv_start=kv_start, sink=sink,
                                               window=window, scale=scale, lse=lse)
                if paged:
                    far = guard.guarded_share(far, guard.page_share(q, state.pages, lse, scale=scale))
            share = rule.group_max(far, kv_heads)
            if cfg.guard == "heads":
                share = share.masked_fill(self._full_mask(layer_idx, kv_heads, q.device).view(1, kv_heads),
                                          float("inf"))
            local = share <= cfg.tau_for(layer_idx)
        local = local | ~decided  # an empty bulk: local and full are the same attention
        self.stats.add(layer_idx, local, decided, share)
        return ~decided if self.observe_only else local

    def _static_move(self, state: RoutingState, k: torch.Tensor, n_valid: torch.Tensor, *,
                     floor: torch.Tensor) -> None:
        """One static step's move of the moments, on the device: the key ``n_valid - 1 - window`` left the window
        (bulk: it joins; local: it leaves, and the new key ``n_valid - 1`` joins), where at or past ``floor``."""
        if state.moments is None:
            raise RuntimeError("head routing: static steps need begin_static() first")
        gone = n_valid.long().view(1) - 1 - self.window
        keys = k.index_select(2, gone.clamp(min=0))
        weight = rule.range_weight(gone, floor=floor) * (gone >= 0).to(torch.float32).view(1, 1)
        if self.config.guard == "pages":
            if state.pages is None:
                raise RuntimeError("head routing: static steps need begin_static() first")
            guard.add_key(state.pages, keys, gone, weight)  # it joins the bulk: its page's box grows
        if self.config.stats == "bulk":
            rule.accumulate(state.moments, keys, weight)
            return
        rule.accumulate(state.moments, keys, -weight)
        new = n_valid.long().view(1) - 1
        rule.accumulate(state.moments, k.index_select(2, new), rule.range_weight(new, floor=floor))

    def _static_mask(self, layer: int, kv_heads: int, device) -> torch.Tensor:
        return self._mask("local", self.config.local_masks, layer, kv_heads, device)

    def _full_mask(self, layer: int, kv_heads: int, device) -> torch.Tensor:
        return self._mask("full", self.config.full_masks, layer, kv_heads, device)

    def _mask(self, kind: str, masks: dict[int, list[bool]], layer: int, kv_heads: int, device) -> torch.Tensor:
        """bool ``[kv_heads]`` of ``masks[layer]`` (all False where absent), made once per device."""
        key = (kind, layer, torch.device(device))
        mask = self._masks.get(key)
        if mask is None:
            values = masks.get(layer, [False] * kv_heads)
            if len(values) != kv_heads:
                from ..errors import LightTransferError

                raise LightTransferError(f"head routing: the {kind} mask of layer {layer} has {len(values)} entries "
                                         f"for {kv_heads} KV heads.")
            mask = self._masks[key] = torch.tensor(values, dtype=torch.bool, device=device)
        return mask


def _add_pages(pages: guard.PageBounds, keys: torch.Tensor, lo: int, hi: int, *, floor: torch.Tensor) -> None:
    """Fold the keys ``[lo, hi)`` of ``keys [B, Hkv, N, D]`` into ``pages``, each where ``index >= floor[b]``, in
    blocks of :data:`~lighttransfer.kernels.head_routing.MOVE_BLOCK` keys (the first step after a prefill adds the
    prompt's whole bulk)."""
    for a in range(lo, hi, rule.MOVE_BLOCK):
        b = min(hi, a + rule.MOVE_BLOCK)
        index = torch.arange(a, b, device=keys.device)
        guard.add_range(pages, keys[:, :, a:b], a, rule.range_weight(index, floor=floor))


def resolve_head_routing(config, *, mode: str | None, tau: float | None = None, share: float | None = None,
                         stats: str | None = None, cov: str | None = None, sink: int | None = None,
                         window: int | None = None, seed: int | None = None, guard: str | None = None,
                         page: int | None = None,
                         full_masks: dict[int, list[bool]] | None = None) -> HeadRoutingConfig | None:
    """The checkpoint block's ``head_routing`` with explicit options over it.

    ``mode``: ``None`` keeps the block's (dense without one), ``"dense"`` turns it off, else a mode name. Options
    without a mode (and without a block entry) are an error: they would do nothing.
    """
    from ..errors import LightTransferError
    from ..hybrid_format import HybridConfig

    block = HybridConfig.from_model_config(config) if config is not None else None
    stored = block.head_routing_config() if block is not None else None
    given = {k: v for k, v in dict(tau=tau, share=share, stats=stats, cov=cov, sink=sink, window=window,
                                   seed=seed, guard=guard, page=page, full_masks=full_masks).items()
             if v is not None}
    if mode == "dense":
        return None
    if mode is None and stored is None:
        if given:
            first = next(iter(given))
            name = "full_heads" if first == "full_masks" else first
            raise LightTransferError(f"routing_{name} needs head_routing='qada', 'oracle' or 'random' "
                                     "(the checkpoint stores no head routing).")
        return None
    base = stored.to_dict() if stored is not None else {}
    if mode is not None and mode != base.get("mode"):
        base = {"mode": mode}
    if given.get("guard", base.get("guard", "none")) != base.get("guard", "none"):
        base.pop("page", None)  # another guard (or none): the stored guard's page size and heads go with it
        base.pop("full_masks", None)
    return HeadRoutingConfig.from_dict({**base, **given})


__all__ = ["HeadRouting", "RoutingState", "RoutingStats", "resolve_head_routing"]
