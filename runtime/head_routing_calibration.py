"""Thresholds for a target routed share: run the model on calibration text, read the far shares, take quantiles.

``tau`` compares with a far share (a probability), but what a user wants to fix is the share ``ρ`` of (query, KV
head) decisions routed local. :func:`far_share_distribution` runs each calibration sample's prompt as a prefill and
its last ``last`` tokens as a continuation, every query decided as if decoded alone (the runtime's
``select_chunks``), with the routing observed but not applied (every head attends fully: the model's own
activations); it returns, per full layer, each decision's largest far share over the KV head's query heads (``f̂``
for ``qada``, the exact share for ``oracle``). :func:`calibrate_head_routing` then sets ``tau`` to the
``ρ``-quantile, per layer (the default: layers differ by orders of magnitude) or of all layers together, so that a
share ``≈ ρ`` of the calibration decisions goes local. Decisions with an empty bulk are not counted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from ..compat import cache_keyword, output_cache
from ..errors import LightTransferError
from ..hybrid_format import HeadRoutingConfig
from .head_routing import HeadRouting
from .hybrid import runtime_of


@contextlib.contextmanager
def _observing(model, config: HeadRoutingConfig):
    runtime = runtime_of(model)
    before = runtime.head_routing, runtime.select_chunks
    layout = runtime.layout
    routing = HeadRouting(config, sink=layout.sink, window=layout.window)
    routing.observe_only = True
    routing.stats.record = True
    runtime.head_routing, runtime.select_chunks = routing, True
    try:
        yield routing
    finally:
        runtime.head_routing, runtime.select_chunks = before


def far_share_distribution(model, samples: Sequence[torch.Tensor], *, mode: str = "qada", stats: str = "bulk",
                           cov: str = "full", last: int | Sequence[int] = 32, sink: int | None = None,
                           window: int | None = None, guard: str = "none",
                           page: int | None = None,
                           full_masks: dict[int, list[bool]] | None = None) -> dict[int, torch.Tensor]:
    """``{full layer: float32 [queries, kv_heads]}``: per KV head, the largest far share of its query heads, for each
    of the last ``last`` tokens of each sample (1-D token ids) that has a bulk, for a model switched to the hybrid
    runtime; ``last`` may also be one count per sample (e.g. each prompt's answer tokens). ``guard="pages"``: the
    guarded share ``max(f̂, g)`` (what such a routing compares with ``tau``); ``guard="heads"``: the KV heads of
    ``full_masks`` at ``inf`` (never local)."""
    if mode not in ("qada", "oracle"):
        raise LightTransferError(f"far shares exist for head_routing 'qada' or 'oracle', not {mode!r}.")
    lasts = [int(last)] * len(samples) if isinstance(last, int) else [int(n) for n in last]
    if len(lasts) != len(samples):
        raise LightTransferError(f"last gives {len(lasts)} counts for {len(samples)} calibration samples.")
    if any(n < 1 for n in lasts):
        raise LightTransferError(f"last must be >= 1 query, got {min(lasts)}.")
    config = HeadRoutingConfig(mode=mode, tau=0.0, stats=stats, cov=cov, sink=sink, window=window, guard=guard,
                               page=page, full_masks=full_masks or {})
    device = next(model.parameters()).device
    keyword = cache_keyword(model)
    with _observing(model, config) as routing, torch.inference_mode():
        for ids, last in zip(samples, lasts, strict=True):
            ids = torch.as_tensor(ids, dtype=torch.long).view(-1).to(device)
            if ids.numel() <= last:
                raise LightTransferError(f"a calibration sample of {ids.numel()} tokens is not longer than "
                                         f"last={last}.")
            out = model(ids[None, :-last], use_cache=True)
            model(ids[None, -last:], use_cache=True, **{keyword: output_cache(out)})
        shares = {layer: torch.cat(v) for layer, v in sorted(routing.stats.shares.items()) if v}
    if not shares:
        raise LightTransferError(f"no decision had a bulk to route: the samples are not longer than sink + window "
                                 f"({routing.sink} + {routing.window}) plus last={max(lasts)}.")
    return shares


def calibrate_head_routing(model, samples: Sequence[torch.Tensor], *, share: float, mode: str = "qada",
                           stats: str = "bulk", cov: str = "full", per_layer: bool = True,
                           last: int | Sequence[int] = 32,
                           sink: int | None = None, window: int | None = None, guard: str = "none",
                           page: int | None = None,
                           full_masks: dict[int, list[bool]] | None = None) -> HeadRoutingConfig:
    """A :class:`HeadRoutingConfig` whose ``tau`` (per layer, or one for all) routes a share ``≈ share`` of the
    calibration decisions local (see the module docstring). With ``guard="heads"`` the share counts every decision,
    the always-full heads' too: the others are routed local more often to reach it, or all of them where it is
    out of reach (``tau = 1``)."""
    if not 0.0 <= share <= 1.0:
        raise LightTransferError(f"routing_share must be in [0, 1], got {share!r}.")
    shares = far_share_distribution(model, samples, mode=mode, stats=stats, cov=cov, last=last, sink=sink,
                                    window=window, guard=guard, page=page, full_masks=full_masks)

    def quantile(values: torch.Tensor) -> float:
        return share_threshold(values, share)

    common = dict(mode=mode, stats=stats, cov=cov, sink=sink, window=window, guard=guard, page=page,
                  full_masks=full_masks or {})
    if per_layer:
        return HeadRoutingConfig(**common, layer_tau={layer: quantile(v) for layer, v in shares.items()},
                                 tau=quantile(torch.cat(list(shares.values()))))
    return HeadRoutingConfig(**common, tau=quantile(torch.cat(list(shares.values()))))


def share_threshold(values: torch.Tensor, share: float) -> float:
    """The largest ``tau`` among ``values`` (far shares, any shape) with at most a share ``share`` of them ``<= tau``:
    the local count stays at or under the target. Ties at one value go together, so a tie across the target steps
    down to the next smaller value: shares saturated at 1.0 in float32 (the pages guard's bound, ``g``, is often
    far above the local mass) would otherwise give ``tau = 1`` and route *every* decision local."""
    ordered = values.double().flatten().sort().values
    k = int(share * ordered.numel())
    if k == 0:
        return 0.0
    if k < ordered.numel() and ordered[k] == ordered[k - 1]:  # the k-th value ties with the next
        below = ordered[:k][ordered[:k] < ordered[k]]
        return 0.0 if below.numel() == 0 else float(below[-1])
    return min(1.0, float(ordered[k - 1]))


def far_share_summary(shares: dict[int, torch.Tensor], *, quantiles=(0.1, 0.5, 0.9)) -> dict[str, dict]:
    """Per layer and KV head, the mean and quantiles of :func:`far_share_distribution`'s shares: ``{"layer":
    {"kv_head": {"mean": ..., "p10": ..., ...}}}`` (JSON-ready), how much far context each head asks for."""
    out: dict[str, dict] = {}
    for layer, values in sorted(shares.items()):
        q = torch.quantile(values.double(), torch.tensor(quantiles, dtype=torch.float64), dim=0)  # [Q, kv_heads]
        out[str(layer)] = {str(h): {"mean": float(values[:, h].mean()),
                                    **{f"p{round(100 * p)}": float(q[i, h]) for i, p in enumerate(quantiles)}}
                           for h in range(values.shape[1])}
    return out


__all__ = ["far_share_distribution", "calibrate_head_routing", "far_share_summary", "share_threshold"]
