"""Chunked prefill: run a long prompt through a hybrid model in pieces, filling one bounded cache.

Each chunk's queries attend over what the cache holds plus the chunk itself, so for a streaming layer the
memory of a chunk is ``O(chunk * (sink + window + chunk))`` instead of ``O(prompt^2)``; the result equals the
one-pass prefill (same rule, same positions). Under the ``full`` prefill policy the streaming layers keep their
whole history until the last chunk so that their prefill attention stays full.
"""

from __future__ import annotations

import torch

from ..errors import LightTransferError
from .hybrid import runtime_of


@torch.no_grad()
def prefill_chunked(model, input_ids: torch.Tensor, *, chunk_size: int, attention_mask: torch.Tensor | None = None,
                    cache=None, logits: str = "last"):
    """Prefill ``input_ids [batch, seq]`` in chunks of ``chunk_size`` tokens.

    Args:
        model: a model prepared by :func:`lighttransfer.load`.
        input_ids: int64 ``[batch, seq]`` (left padding allowed, given by ``attention_mask``).
        chunk_size: tokens per forward pass.
        attention_mask: ``[batch, seq]``, 1 = real token; default all ones.
        cache: a cache to continue (default: a fresh :class:`HybridCache`).
        logits: ``last`` (only the last position's logits, ``[batch, 1, vocab]``, all that generation needs) or
            ``all`` (every position's, ``[batch, seq, vocab]``; for checks on short prompts).

    Returns:
        The last chunk's model output, with ``logits`` as asked and the filled cache in ``past_key_values``
        (also under ``cache`` with transformers >= 5.24).
    """
    if chunk_size < 1:
        raise LightTransferError(f"chunk_size must be a positive number of tokens, got {chunk_size}.")
    if logits not in ("last", "all"):
        raise LightTransferError(f"logits must be 'last' or 'all', got {logits!r}.")
    runtime = runtime_of(model)
    cache = cache if cache is not None else runtime.make_cache()
    seq = input_ids.shape[1]
    past = cache.get_seq_length()
    if attention_mask is None:
        attention_mask = torch.ones(input_ids.shape[0], past + seq, dtype=torch.long, device=input_ids.device)
    if attention_mask.shape[1] == seq and past:
        ones = attention_mask.new_ones(attention_mask.shape[0], past)
        attention_mask = torch.cat([ones, attention_mask], dim=1)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    collected = []
    output = None
    try:
        for start in range(0, seq, chunk_size):
            stop = min(seq, start + chunk_size)
            cache.sequence.defer_compaction = stop < seq
            output = model(
                input_ids=input_ids[:, start:stop],
                attention_mask=attention_mask[:, : past + stop],
                position_ids=position_ids[:, past + start: past + stop],
                use_cache=True,
                **({"logits_to_keep": 1} if logits == "last" else {}),
                **{runtime.cache_keyword: cache},
            )
            if logits == "all":
                collected.append(output.logits)
    finally:
        cache.sequence.defer_compaction = False
    if logits == "all":
        output.logits = torch.cat(collected, dim=1)
    return output


__all__ = ["prefill_chunked"]
