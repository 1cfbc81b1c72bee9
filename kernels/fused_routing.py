"""One full layer's QAdA decode step fused on the device: the decision (:mod:`.head_routing`, ``stats="bulk"``) and
the routed attention (:mod:`.routed_decode`) in two kernel passes and a merge, nothing read on the host.

What the step computes, for the last ``q`` of ``n`` keys (``n = N``, or the device-side ``n_valid``), real keys
from ``kv_start``, the moments holding the bulk of the previous query (``[kv_start + sink, n - 1 - window)``):

1. the key ``n - 1 - window`` leaves the window: it joins the moments where it is real and past the sinks (the rule
   of :func:`~.head_routing.move_range` with ``floor = kv_start + sink``), so they hold this query's bulk;
2. per query head ``f̂`` (:func:`~.head_routing.predicted_far_share`), per (sequence, KV head) local iff every query
   head has ``f̂ <= tau`` (:func:`~.head_routing.route_local`), and local where the bulk is empty;
3. :func:`~.routed_decode.routed_decode` with that routing; the routing counts (local and decided, decided = a
   non-empty bulk) are added to ``counts`` when given.

:func:`fused_routed_decode_reference` is exactly that composition of the existing functions. The Triton path
has four variants computing the same. Three launches (:mod:`.fused_routing_triton`): one for the local keys and the
decision (whose local attention is the local part of the output, full or local pair), one for the bulk keys of the
full-routed pairs, and the merge; see ``docs/head_routing.md`` ("Fused decision") for the passes and what they
read. One launch and the merge (:mod:`.fused_routing_one_triton`): every program of a pair computes the pair's
decision itself (bit-identical in each), then its chunk of the bulk where the pair is full; it reads the local keys
and the moments once per program instead of once per pair, so the launcher takes it only where that is small
against the three-launch path's serial pass (:func:`pick_variant`). The overlapped launch and its merge
(:mod:`.fused_routing_overlap_triton`): pass 1's programs and the bulk's in one grid, the bulk attended
speculatively and stopped once its pair is decided local; the merge drops a local pair's bulk slots. The balanced
variant (:mod:`.fused_routing_balanced_triton`): the three-launch pass 1, then the full pairs' bulk cut into equal
pieces over a fixed grid whatever the routed share, and a merge that reads only the slots each pair used.
"""

from __future__ import annotations

import math

import torch

from ..errors import LightTransferError
from . import head_routing as rule
from .attention import check_qkv, check_triton_support
from .routed_decode import routed_decode_reference
from .switch import triton_runs_on


def fold_leaving_key(moments: rule.KeyMoments, k: torch.Tensor, n_keys: torch.Tensor | int, *,
                     floor: torch.Tensor, window: int) -> None:
    """In place: the key ``n - 1 - window`` of ``k [batch, kv_heads, N, head_dim]`` joins ``moments`` where it
    exists and is at or past ``floor [batch]`` (``kv_start + sink``); one device-side index, no host read."""
    gone = rule._on_device(n_keys, k.device) - 1 - window
    weight = rule.range_weight(gone, floor=floor) * (gone >= 0).to(torch.float32).view(1, 1)
    rule.accumulate(moments, k.index_select(2, gone.clamp(min=0)), weight)


def fused_routed_decode_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, moments: rule.KeyMoments, *,
                                  tau: float, sink: int, window: int, kv_start: torch.Tensor | None = None,
                                  scale: float | None = None, n_valid: torch.Tensor | None = None,
                                  counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch :func:`fused_routed_decode`: :func:`fold_leaving_key`, then the decision of
    :mod:`.head_routing`, then :func:`~.routed_decode.routed_decode_reference`."""
    batch, kv_heads = q.shape[0], k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    start = torch.zeros(batch, dtype=torch.long, device=q.device) if kv_start is None \
        else kv_start.to(q.device).long()
    n_keys = k.shape[2] if n_valid is None else n_valid
    fold_leaving_key(moments, k, n_keys, floor=start + sink, window=window)
    far = rule.predicted_far_share(q, k, moments, n_keys=n_keys, kv_start=start, sink=sink, window=window,
                                   scale=scale)
    decided = (rule.bulk_count(n_keys, start, sink=sink, window=window) > 0).view(batch, 1).expand(batch, kv_heads)
    local = rule.route_local(far, tau, kv_heads) | ~decided
    if counts is not None:
        counts[0] += (local & decided).sum()
        counts[1] += decided.sum()
    o = routed_decode_reference(q, k, v, local, sink=sink, window=window, kv_start=kv_start, scale=scale,
                                n_valid=n_valid)
    return o, local


def fused_routed_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, moments: rule.KeyMoments, *,
                        tau: float, sink: int, window: int, kv_start: torch.Tensor | None = None,
                        scale: float | None = None, n_valid: torch.Tensor | None = None,
                        counts: torch.Tensor | None = None, workspace=None, splits: int | None = None,
                        local_splits: int | None = None, variant: str | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """QAdA-routed decode attention of one query per sequence, the decision included, in place on ``moments``.

    Args:
        q: ``[batch, heads, 1, head_dim]``, the last of the ``n`` keys.
        k, v: ``[batch, kv_heads, N, head_dim]`` (GQA: contiguous groups of ``heads / kv_heads`` query heads).
        moments: float32 :class:`~.head_routing.KeyMoments` (full or diagonal, contiguous, on ``q``'s device) of
            the bulk of the previous query, ``[kv_start + sink, n - 1 - window)``; on return, of this query's.
        tau: the far-share threshold (a KV head goes local iff all its query heads have ``f̂ <= tau``).
        sink, window: the local set (``sink >= 0``, ``window >= 1``).
        kv_start: int ``[batch]`` left padding.
        scale: softmax scale, default ``1 / sqrt(head_dim)``.
        n_valid: int tensor ``[1]``: only keys ``j < n_valid`` exist (a static step), default ``N``.
        counts: float64 ``[2]`` on the device, optional: ``+= (pairs routed local with a non-empty bulk, pairs with
            a non-empty bulk)``.
        workspace: the Triton path's counters (:class:`~.fused_routing_triton.FusedWorkspace`, zero between
            launches); made per call when ``None`` (keep one per layer to capture the step in a CUDA graph).
        splits, local_splits: chunks of the key axis (pass 2, or the one-launch kernel) and of the local set
            (pass 1) per (sequence, KV head) (Triton only; tests).
        variant: the Triton path's kernels: ``"overlap"`` (:mod:`.fused_routing_overlap_triton`: the bulk attended
            speculatively beside the decision, stopped once it says local; one launch and the merge),
            ``"one-launch"`` (:mod:`.fused_routing_one_triton`: every program decides its pair redundantly, one
            launch and the merge), ``"three-launch"`` (:mod:`.fused_routing_triton`: two passes and the merge),
            ``"balanced"`` (the same pass 1, then :mod:`.fused_routing_balanced_triton`: the full pairs' bulk spread
            evenly over one program per SM whatever the routed share, ``splits`` programs where given, and its
            merge), or ``None``: the launcher's choice (:func:`pick_variant`). Same outputs, flags, moments and counts either
            way.

    Returns:
        ``(o [batch, heads, 1, head_dim] in q.dtype, local bool [batch, kv_heads])``.
    """
    check_qkv("fused_routed_decode", q, k, v)
    batch, heads, n, dim = q.shape
    kv_heads = k.shape[1]
    if n != 1:
        raise LightTransferError(f"fused_routed_decode: one query per sequence, got {n} (q {tuple(q.shape)}).")
    if sink < 0 or window < 1:
        raise LightTransferError(f"fused_routed_decode: sink must be >= 0 and window >= 1, got {sink}, {window}.")
    if kv_start is not None and tuple(kv_start.shape) != (batch,):
        raise LightTransferError(f"fused_routed_decode: kv_start must be [batch] = [{batch}], got "
                                 f"{tuple(kv_start.shape)}.")
    if n_valid is not None and (n_valid.numel() != 1 or n_valid.dtype not in (torch.int32, torch.int64)):
        raise LightTransferError(f"fused_routed_decode: n_valid must be one int32/int64 element, got "
                                 f"{tuple(n_valid.shape)} {n_valid.dtype}.")
    _check_moments(moments, batch, kv_heads, dim, q.device)
    if counts is not None and (tuple(counts.shape) != (2,) or counts.dtype != torch.float64
                               or counts.device != q.device):
        raise LightTransferError(f"fused_routed_decode: counts must be float64 [2] on {q.device}, got "
                                 f"{tuple(counts.shape)} {counts.dtype} on {counts.device}.")
    tau = float(tau)
    if not math.isfinite(tau):
        raise LightTransferError(f"fused_routed_decode: tau must be a finite float, got {tau!r}.")
    if variant not in VARIANTS:
        raise LightTransferError(f"fused_routed_decode: variant must be one of {[*VARIANTS]}, got {variant!r}.")
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    if not triton_runs_on(q) or k.shape[2] == 0:
        return fused_routed_decode_reference(q, k, v, moments, tau=tau, sink=sink, window=window, kv_start=kv_start,
                                             scale=scale, n_valid=n_valid, counts=counts)
    check_triton_support("fused_routed_decode", q)
    from .fused_routing_triton import FusedWorkspace, fused_routed_decode_triton

    if workspace is None:
        workspace = FusedWorkspace.zeros(batch, kv_heads, q.device)
    elif not workspace.fits(batch, kv_heads, q.device):
        raise LightTransferError(f"fused_routed_decode: the workspace is for another shape or device (batch "
                                 f"{batch}, kv_heads {kv_heads}, {q.device}); make one with FusedWorkspace.zeros.")
    if variant is None:
        variant = pick_variant(q, k, sink=int(sink), window=int(window), diagonal=moments.diagonal, splits=splits)
    if variant == "overlap":
        from .fused_routing_overlap_triton import fused_overlap_triton

        o, flags = fused_overlap_triton(q, k, v, moments, tau=tau, sink=int(sink), window=int(window),
                                        kv_start=kv_start, scale=scale, n_valid=n_valid, counts=counts,
                                        workspace=workspace, splits=splits, local_splits=local_splits)
    elif variant == "one-launch":
        from .fused_routing_one_triton import fused_one_launch_triton

        o, flags = fused_one_launch_triton(q, k, v, moments, tau=tau, sink=int(sink), window=int(window),
                                           kv_start=kv_start, scale=scale, n_valid=n_valid, counts=counts,
                                           workspace=workspace, splits=splits)
    else:
        o, flags = fused_routed_decode_triton(q, k, v, moments, tau=tau, sink=int(sink), window=int(window),
                                              kv_start=kv_start, scale=scale, n_valid=n_valid, counts=counts,
                                              workspace=workspace, splits=splits, local_splits=local_splits,
                                              balanced=variant == "balanced")
    return o, flags.view(torch.bool)


VARIANTS = (None, "overlap", "one-launch", "three-launch", "balanced")


def pick_variant(q: torch.Tensor, k: torch.Tensor, *, sink: int, window: int, diagonal: bool,
                 splits: int | None = None) -> str:
    """The Triton path the launcher takes for ``q [batch, heads, 1, head_dim]`` over ``k [batch, kv_heads, N,
    head_dim]``: ``"three-launch"``. On an H200 at the 8B shape (32k keys) it beat the one-launch kernel at batch 1,
    75.0 against 128.7 us, where a byte count had predicted the opposite (:mod:`.fused_routing_one_triton`), and
    the one launch reads more still from batch 2 on. The overlapped launch costs less with every pair full (+47%
    over dense at batch 1 against +102%) but saved nothing at batch 1 with pairs local (its bulk finished before
    the decision) and trailed at batch 16 (``bench/results/head_routing_h200/overlap``). The arguments stay so
    that a rule can return here once a variant wins somewhere."""
    del q, k, sink, window, diagonal, splits
    return "three-launch"


def _check_moments(moments: rule.KeyMoments, batch: int, kv_heads: int, dim: int, device) -> None:
    second = (batch, kv_heads, dim) if moments.diagonal else (batch, kv_heads, dim, dim)
    want = {"count": (batch,), "first": (batch, kv_heads, dim), "second": second}
    for name, shape in want.items():
        t = getattr(moments, name)
        if tuple(t.shape) != shape or t.dtype != torch.float32 or t.device != torch.device(device) \
                or not t.is_contiguous():
            raise LightTransferError(f"fused_routed_decode: moments.{name} must be contiguous float32 {list(shape)} "
                                     f"on {device}, got {tuple(t.shape)} {t.dtype} on {t.device}.")


__all__ = ["fused_routed_decode", "fused_routed_decode_reference", "fold_leaving_key", "pick_variant", "VARIANTS"]
