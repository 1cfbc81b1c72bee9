"""Generation over static decode steps: prefill once, then one :class:`~.graphs.StaticDecoder` call per token.

The loop gpt-fast runs, with transformers' conventions: left padding through ``attention_mask`` (positions counted
from each sequence's first real token), greedy decoding or sampling at a temperature with nucleus ``top_p``, and
per-sequence stopping at ``eos_token_id`` (a finished sequence is filled with ``pad_token_id``, as ``generate``
does). The cache is reserved at once for prompt + ``max_new_tokens`` (rounded up to :data:`RESERVE_ALIGN`), so no
step allocates or copies the history.

With ``cuda_graphs`` the decoders are kept on the model's runtime, one per (batch, reserved length, padded or not),
at most :data:`KEPT_DECODERS`: a later generation of the same shape prefills a cache of its own, copies it into
the kept decoder's cache and replays the graph captured the first time. Its result's ``cache`` is then the kept
one, which the next generation of that shape overwrites.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..compat import output_cache
from ..errors import LightTransferError
from .cache import HybridCache
from .chunked import prefill_chunked
from .graphs import StaticDecoder
from .hybrid import runtime_of

# reserved lengths are rounded up to this many tokens, so that prompts of about the same length share a graph
RESERVE_ALIGN = 1024
KEPT_DECODERS = 2


@dataclass
class StaticGeneration:
    """What :func:`generate_static` returns: ``sequences`` int64 ``[batch, prompt + new]``, the filled ``cache``,
    and ``decode_path`` (``cuda graph`` or ``eager (<why>)``)."""

    sequences: torch.Tensor
    cache: HybridCache
    decode_path: str


def next_tokens(logits: torch.Tensor, *, temperature: float, top_p: float, top_k: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """int64 ``[batch]`` from ``logits [batch, vocab]``: the argmax at ``temperature == 0``, otherwise a sample of
    ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens (when given) and to the
    smallest set of tokens whose probability reaches ``top_p`` (the most likely token always stays), as
    transformers' ``TopKLogitsWarper`` and ``TopPLogitsWarper`` do."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_static(
    model,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    cuda_graphs: bool = True,
    chunk_size: int | None = None,
    on_tokens: Callable[[torch.Tensor], None] | None = None,
) -> StaticGeneration:
    """Prefill ``input_ids [batch, prompt]`` and generate up to ``max_new_tokens`` tokens per sequence.

    Args:
        model: a model prepared by :func:`lighttransfer.load`.
        attention_mask: ``[batch, prompt]``, 1 = real token (left padding); default all ones.
        temperature, top_p, top_k: see :func:`next_tokens`.
        eos_token_id: token(s) that end a sequence; generation stops when every sequence has ended.
        pad_token_id: what fills a sequence after its end (default: its first ``eos_token_id``).
        cuda_graphs: replay the decode step from a CUDA graph where possible (else the same static steps eagerly).
        chunk_size: prefill in chunks of this many tokens (default: the model's ``prefill_chunk_size``, else one
            pass).
        on_tokens: called with each step's new tokens (int64 ``[batch]``), e.g. to stream text.
    """
    if max_new_tokens < 1:
        raise LightTransferError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    runtime = runtime_of(model)
    batch, prompt = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    reserve = -(-(prompt + max_new_tokens) // RESERVE_ALIGN) * RESERVE_ALIGN
    key = (batch, reserve, bool((attention_mask[:, 0] == 0).any()), input_ids.device)
    kept = runtime.decoders.get(key) if cuda_graphs else None
    # with a kept decoder, the prefill's cache only passes its tokens on: no room for the new ones
    cache = runtime.make_cache(max_tokens=None if kept is not None else reserve)
    if chunk_size is None:
        chunk_size = getattr(model.generation_config, "prefill_chunk_size", None)
    if chunk_size and prompt > chunk_size:
        out = prefill_chunked(model, input_ids, chunk_size=chunk_size, attention_mask=attention_mask, cache=cache)
    else:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                    logits_to_keep=1, **{runtime.cache_keyword: cache})
    cache = output_cache(out)
    eos = torch.tensor([] if eos_token_id is None else
                       [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                       dtype=torch.long, device=input_ids.device)
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if eos.numel() else 0
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    produced = []
    token = next_tokens(out.logits[:, -1], temperature=temperature, top_p=top_p, top_k=top_k)
    decoder = None
    try:
        for i in range(max_new_tokens):
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            produced.append(token)
            if on_tokens is not None:
                on_tokens(token)
            if eos.numel():
                finished |= torch.isin(token, eos)
                if bool(finished.all()):
                    break
            if i == max_new_tokens - 1:
                break
            if decoder is None:
                decoder, cache = _decoder_for(model, runtime, key, cache, reserve, cuda_graphs)
            token = next_tokens(decoder(token), temperature=temperature, top_p=top_p, top_k=top_k)
        path = decoder.path if decoder is not None else "no decode step"
    finally:
        if decoder is not None:
            decoder.pause()
    return StaticGeneration(sequences=torch.cat([input_ids, torch.stack(produced, 1)], dim=1), cache=cache,
                            decode_path=path)


def _decoder_for(model, runtime, key, cache: HybridCache, reserve: int, cuda_graphs: bool):
    """``(decoder, its cache)``: the runtime's kept decoder of this shape fed with ``cache``, else a new one
    (kept when ``cuda_graphs``, the oldest dropped beyond :data:`KEPT_DECODERS`)."""
    kept = runtime.decoders.get(key) if cuda_graphs else None
    if kept is not None and kept.compatible(cache):
        kept.reuse(cache)
        return kept, kept.cache
    if kept is not None:  # another layout this time (online selection): capture anew
        runtime.decoders.pop(key).close()
    decoder = StaticDecoder(model, cache, tokens=reserve, cuda_graphs=cuda_graphs)
    if cuda_graphs:
        runtime.decoders[key] = decoder
        while len(runtime.decoders) > KEPT_DECODERS:
            runtime.decoders.pop(next(iter(runtime.decoders))).close()
    return decoder, cache


__all__ = ["generate_static", "next_tokens", "StaticGeneration", "RESERVE_ALIGN", "KEPT_DECODERS"]
