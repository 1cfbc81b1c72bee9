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
   local when all its query heads are at or below the layer's ``tau``. ``random`` draws local with probability
   ``share``; ``static`` applies fixed per-layer masks;
3. attention: :func:`lighttransfer.kernels.routed_decode` (the Triton kernel on CUDA, the reference on the CPU).

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
        c = self.counts.get(layer)
        if c is None:
            c = self.counts[layer] = torch.zeros(2, dtype=torch.float64, device=local.device)
        c[0] += (local & decided).sum()
        c[1] += decided.sum()
        if self.record and share is not None:
            self.shares.setdefault(layer, []).append(share[decided[:, 0]].float().cpu())  # [sequences, kv_heads]

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
        self.counts.clear()
        self.shares.clear()

    def to_dict(self) -> dict:
        decided = int(sum(c[1].item() for c in self.counts.values()))
        return {"local_share": self.local_share(), "decisions": decided,
                "by_layer": {str(k): v for k, v in self.local_share_by_layer().items()}}


class RoutingState:
    """One full layer's key moments (``qada``): :class:`~lighttransfer.kernels.head_routing.KeyMoments` over the
    key-index range ``(lo, hi)``, for a batch and a key count."""

    def __init__(self) -> None:
        self.moments: rule.KeyMoments | None = None
        self.range = (0, 0)
        self.keys = 0

    def prepare(self, k: torch.Tensor, *, diagonal: bool, n_keys: int) -> None:
        batch, kv_heads, _, dim = k.shape
        m = self.moments
        if m is None or m.first.shape != (batch, kv_heads, dim) or m.diagonal != diagonal or n_keys < self.keys:
            self.moments = rule.KeyMoments.zeros(batch, kv_heads, dim, diagonal=diagonal, device=k.device)
            self.range = (0, 0)
        self.keys = n_keys


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
        self._masks: dict[tuple[int, torch.device], torch.Tensor] = {}

    def generator(self, device) -> torch.Generator:
        device = torch.device(device)
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device).manual_seed(self.config.seed)
        return g

    def reseed(self) -> None:
        """Start the ``random`` mode's draws again (each evaluated sequence then gets the same draws)."""
        self._generators.clear()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layer_idx: int, state: RoutingState,
               kv_start: torch.Tensor | None, scale: float | None) -> torch.Tensor:
        """Routed attention of ``q [B, H, n, D]`` (the last ``n`` of the keys ``k, v [B, Hkv, N, D]``), each query
        decided and attended as if decoded alone; returns ``[B, H, n, D]``."""
        n, big_n = q.shape[2], k.shape[2]
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        start = torch.zeros(q.shape[0], dtype=torch.long, device=q.device) if kv_start is None \
            else kv_start.to(q.device).long()
        outs = []
        for i in range(n):
            end = big_n - n + i + 1
            ks, vs = k[:, :, :end], v[:, :, :end]
            st = start.clamp(max=end - 1)  # a sequence with no real key yet sees its own key
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
               kv_start: torch.Tensor, scale: float) -> torch.Tensor:
        """bool ``[B, Hkv]`` routing of one query per sequence ``q [B, H, 1, D]`` (the last of ``k``'s keys)."""
        cfg, sink, window = self.config, self.sink, self.window
        batch, kv_heads, n_keys = k.shape[0], k.shape[1], k.shape[2]
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
                state.prepare(k, diagonal=cfg.cov == "diag", n_keys=n_keys)
                new = (0, max(0, n_keys - window)) if cfg.stats == "bulk" else (max(0, n_keys - window), n_keys)
                new = (max(new[0], state.range[0]), max(new[1], state.range[1]))
                rule.move_range(state.moments, k, old=state.range, new=new, floor=kv_start + sink)
                state.range = new
                far = rule.predicted_far_share(q, k, state.moments, n_keys=n_keys, kv_start=kv_start, sink=sink,
                                               window=window, scale=scale)
            share = rule.group_max(far, kv_heads)
            local = share <= cfg.tau_for(layer_idx)
        local = local | ~decided  # an empty bulk: local and full are the same attention
        self.stats.add(layer_idx, local, decided, share)
        return ~decided if self.observe_only else local

    def _static_mask(self, layer: int, kv_heads: int, device) -> torch.Tensor:
        key = (layer, torch.device(device))
        mask = self._masks.get(key)
        if mask is None:
            values = self.config.local_masks.get(layer, [False] * kv_heads)
            mask = self._masks[key] = torch.tensor(values, dtype=torch.bool, device=device)
        return mask


def resolve_head_routing(config, *, mode: str | None, tau: float | None = None, share: float | None = None,
                         stats: str | None = None, cov: str | None = None, sink: int | None = None,
                         window: int | None = None, seed: int | None = None) -> HeadRoutingConfig | None:
    """The checkpoint block's ``head_routing`` with explicit options over it.

    ``mode``: ``None`` keeps the block's (dense without one), ``"dense"`` turns it off, else a mode name. Options
    without a mode (and without a block entry) are an error: they would do nothing.
    """
    from ..errors import LightTransferError
    from ..hybrid_format import HybridConfig

    block = HybridConfig.from_model_config(config) if config is not None else None
    stored = block.head_routing_config() if block is not None else None
    given = {k: v for k, v in dict(tau=tau, share=share, stats=stats, cov=cov, sink=sink, window=window,
                                   seed=seed).items() if v is not None}
    if mode == "dense":
        return None
    if mode is None and stored is None:
        if given:
            raise LightTransferError(f"routing_{next(iter(given))} needs head_routing='qada', 'oracle' or 'random' "
                                     "(the checkpoint stores no head routing).")
        return None
    base = stored.to_dict() if stored is not None else {}
    if mode is not None and mode != base.get("mode"):
        base = {"mode": mode}
    return HeadRoutingConfig.from_dict({**base, **given})


__all__ = ["HeadRouting", "RoutingState", "RoutingStats", "resolve_head_routing"]
