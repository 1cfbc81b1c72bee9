"""The ``k`` largest of each row of a float32 matrix, exact, unsorted, on the device, skipping flagged rows: the
top-k of TokenSelect's votes (:func:`~lighttransfer.kernels.token_select.fresh_selection`).

``torch.topk`` reads every row whatever the Selection Cache decided: at a decode step where every sequence reuses
its cached selection, the votes are all ``-inf`` and their top-k is thrown away, yet it costs as much as a real
one (the largest single part of a TokenSelect hit step at batch 1). :func:`topk_rows` computes the same sets with
an exact radix select (:mod:`.topk_rows_triton`) whose programs for a ``skip`` row exit before reading anything,
in a fixed sequence of seven launches with no host synchronization (CUDA graphs capture it). Which one the selection
takes is :data:`lighttransfer.kernels.token_select.TOPK` (``LIGHTTRANSFER_SELECT_TOPK``: ``radix``, the default,
or ``torch``); the kernel benchmark times both.

The result has a fixed layout, the same on every run: the keys above the k-th value in ascending index order,
then the lowest-index keys tied at it (``torch.topk`` breaks ties its own way): the *values* selected
always equal ``torch.topk``'s as a multiset, the indices as a set wherever no two candidates tie at the boundary.
NaN ranks above ``+inf``, ``-inf`` below everything, as in ``torch.topk``.
"""

from __future__ import annotations

import torch

from ..errors import LightTransferError
from .switch import triton_runs_on


def topk_rows_reference(votes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(votes, k, dim=-1, sorted=False)`` as ``(values float32, indices int64)``, ``[R, k]``."""
    values, indices = torch.topk(votes.float(), int(k), dim=-1, sorted=False)
    return values, indices


def topk_rows(votes: torch.Tensor, k: int, *, skip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest values of each row of ``votes [R, N]`` float32 and their column indices, ``(values [R, k]
    float32, indices [R, k] int64)``, in no particular order; ``1 <= k <= N``.

    ``skip``: bool (or int8) ``[R]``: rows whose result is not wanted (a Selection Cache hit): on the Triton path
    their programs read nothing and their output rows are left unwritten; the reference computes them anyway."""
    if votes.dim() != 2 or votes.dtype != torch.float32:
        raise LightTransferError(f"topk_rows: votes must be float32 [rows, N], got {tuple(votes.shape)} "
                                 f"{votes.dtype}.")
    rows, n = votes.shape
    if not 1 <= int(k) <= n:
        raise LightTransferError(f"topk_rows: k must be in [1, N = {n}], got {k}.")
    if skip is not None and tuple(skip.shape) != (rows,):
        raise LightTransferError(f"topk_rows: skip must be [rows] = [{rows}], got {tuple(skip.shape)}.")
    if not triton_runs_on(votes):
        return topk_rows_reference(votes, k)
    from .topk_rows_triton import topk_rows_triton

    if votes.stride(-1) != 1:
        votes = votes.contiguous()
    from .decode_launch import int8_flags

    return topk_rows_triton(votes, int(k), None if skip is None else int8_flags(skip, votes.device))


__all__ = ["topk_rows", "topk_rows_reference"]
