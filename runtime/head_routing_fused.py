"""The fused QAdA decode step of a routed full layer (:func:`lighttransfer.kernels.fused_routed_decode`): the
decision and the routed attention in one launch and a merge or in three launches (the launcher's rule picks), in
place of :class:`~.head_routing.HeadRouting`'s PyTorch decision followed by the routed kernel.

It is taken when it computes what the unfused path computes: ``mode="qada"`` with ``stats="bulk"`` (the kernel
folds one key per step into the bulk's moments; ``stats="local"`` also removes one and stays on the unfused path),
no guard (the ``pages`` guard's bounds are not in the kernel), not observing only (calibration) and not recording
shares, on tensors the Triton kernels run on (CUDA; on the CPU with ``KERNELS_ON_CPU`` under the interpreter), and
kernels not forced to their references. Otherwise :func:`attend` returns ``None`` and the caller runs today's
path. The routing counts go to the layer's :class:`~.head_routing.RoutingStats` counter from inside the kernel.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..kernels import head_routing as rule
from ..kernels.switch import triton_runs_on

# False: every step on the unfused path (tests compare the two)
FUSED = True
# the fused kernels' variant (``kernels.fused_routed_decode``'s ``variant``): None, the launcher's choice (three
# launches: faster at every batch measured); "overlap", "one-launch" or "three-launch" forces one (tests,
# benchmarks)
VARIANT: str | None = None


def applies(routing, q: torch.Tensor) -> bool:
    """Whether ``routing``'s decode step of ``q`` takes the fused path."""
    from . import head_routing as hr

    cfg = routing.config
    return FUSED and cfg.mode == "qada" and cfg.stats == "bulk" and cfg.guard == "none" \
        and not routing.observe_only and not routing.stats.record and (q.is_cuda or hr.KERNELS_ON_CPU) \
        and not kernels.reference_forced() and triton_runs_on(q)


def attend(routing, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layer_idx: int, state,
           kv_start: torch.Tensor, scale: float, n_valid: torch.Tensor | None = None) -> torch.Tensor | None:
    """``o [B, H, 1, D]`` of one query per sequence ``q`` (the last of ``k``'s keys, or of the first ``n_valid``
    in a static step), decided and attended in one fused step; ``None`` where the fused path does not apply.

    The moments must hold the previous query's bulk ``[kv_start + sink, n - 1 - window)``: a static step's do
    (:meth:`~.head_routing.HeadRouting.begin_static` and the steps before); a dynamic step first moves them there
    (a no-op after a decode step, the prompt's bulk after a prefill), then the kernel adds the key ``n - 1 -
    window``."""
    if not applies(routing, q):
        return None
    cfg, sink, window = routing.config, routing.sink, routing.window
    batch, kv_heads = k.shape[0], k.shape[1]
    floor = kv_start + sink
    if n_valid is None:
        n_keys = k.shape[2]
        state.prepare(k, diagonal=cfg.cov == "diag", n_keys=n_keys)
        before = (0, max(0, n_keys - 1 - window))
        if state.range[1] > before[1]:  # the moments already hold this step's key (never after a decode step)
            return None
        rule.move_range(state.moments, k, old=state.range, new=before, floor=floor)
        state.range = before
    elif state.moments is None:
        return None  # the unfused path says why (begin_static first)
    workspace = state.fused
    if workspace is None or not workspace.fits(batch, kv_heads, q.device):
        from ..kernels.fused_routing_triton import FusedWorkspace

        workspace = state.fused = FusedWorkspace.zeros(batch, kv_heads, q.device)
    o, _ = kernels.fused_routed_decode(q, k, v, state.moments, tau=cfg.tau_for(layer_idx), sink=sink, window=window,
                                       kv_start=kv_start, scale=scale, n_valid=n_valid,
                                       counts=routing.stats.counter(layer_idx, q.device), workspace=workspace,
                                       variant=VARIANT)
    if n_valid is None:
        state.range = (0, max(0, k.shape[2] - window))
    return o


__all__ = ["FUSED", "VARIANT", "applies", "attend"]
