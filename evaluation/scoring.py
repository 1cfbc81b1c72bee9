"""Scoring a continuation: prefill a prefix, then feed the rest through the cache, as generation would.

Every evaluation (perplexity and passkey alike) uses this one path, so that the prefill policy of a hybrid
matters exactly as it does in use: the prefix is one forward call (the prefill), the continuation a second call
through the cache (what a bounded cache, trimmed after a full prefill, sees). Teacher-forced greedy matching on
the continuation is exactly greedy decoding: the decoded tokens equal the answer iff the argmax at every answer
position is the answer's next token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..compat import cache_keyword, output_cache


@torch.inference_mode()
def continuation_logits(
    model,
    input_ids: torch.Tensor,
    split: int,
    *,
    after_prefill: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Logits that predict ``input_ids[:, split:]`` after prefilling ``input_ids[:, :split]``.

    Args:
        model: a transformers causal LM (dense, hybrid, or inside a masked reference).
        input_ids: ``[batch, seq]`` int64, unpadded.
        split: prefix length, ``1 <= split < seq``.
        after_prefill: called between the prefill and the continuation (online mode picks its layers there).
    Returns:
        ``[batch, seq - split, vocab]`` float32 logits; row ``t`` predicts ``input_ids[:, split + t]``.
    """
    seq = input_ids.shape[1]
    if not 1 <= split < seq:
        raise ValueError(f"split must be in [1, {seq - 1}], got {split}")
    first = model(input_ids[:, :split], use_cache=True, logits_to_keep=1)
    if after_prefill is not None:
        after_prefill()
    parts = [first.logits[:, -1:].float()]
    if seq - split > 1:
        cache = {cache_keyword(model): output_cache(first)}
        rest = model(input_ids[:, split:-1], use_cache=True, **cache)
        parts.append(rest.logits.float())
    return torch.cat(parts, dim=1)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per token, ``[batch, n]`` float32 (nats), of ``targets [batch, n]``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def greedy_matches(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[batch]`` bool: whether greedy decoding reproduces ``targets [batch, n]`` exactly."""
    return (logits.argmax(dim=-1) == targets).all(dim=-1)


__all__ = ["continuation_logits", "token_nll", "greedy_matches"]
