"""Generate text from a hybrid model, streaming it as it comes, and measure speed and KV-cache memory."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..architecture import check_positions
from ..compat import output_cache
from ..errors import LightTransferError
from .cache import HybridCache, options_static_unsupported
from .hybrid import RUNTIME_ATTR
from .static_generate import generate_static

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationStats:
    """What one generation cost.

    Attributes:
        prompt_tokens: tokens in the prompt.
        new_tokens: tokens generated.
        prefill_seconds: from the call to the first new token (wall clock).
        decode_seconds: from the first new token to the last.
        kv_bytes: KV-cache bytes held at the end (keys + values, every layer).
        dense_kv_bytes: bytes a dense cache would hold for the same tokens.
        decode_path: how the decode steps ran: ``transformers generate`` (eager, dynamic shapes), ``cuda graph``
            (static steps replayed from one captured graph) or ``eager (<why no graph>)`` (static steps, eagerly).
        selection_lookups, selection_hits: TokenSelect's selections in this generation (full layers x sequences x
            decode steps past the point where the budget stopped covering every key) and how many of them the
            Selection Cache reused (0 and 0 with a dense decode).
    """

    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    kv_bytes: int
    dense_kv_bytes: int
    decode_path: str = "transformers generate"
    selection_lookups: int = 0
    selection_hits: int = 0

    @property
    def selection_hit_rate(self) -> float:
        """Share of TokenSelect's selections reused from the Selection Cache (0 without lookups)."""
        return self.selection_hits / self.selection_lookups if self.selection_lookups else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """New tokens after the first, per second of decoding (``0`` with fewer than two new tokens)."""
        if self.new_tokens < 2 or self.decode_seconds <= 0:
            return 0.0
        return (self.new_tokens - 1) / self.decode_seconds

    @property
    def kv_fraction(self) -> float:
        return self.kv_bytes / self.dense_kv_bytes if self.dense_kv_bytes else 1.0


def _text_streamer(tokenizer, on_text: Callable[[str], None], clock: list[float]):
    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        """Hands decoded text to ``on_text`` and notes when the first new token arrived."""

        def put(self, value):
            if not self.next_tokens_are_prompt and not clock:
                clock.append(time.perf_counter())
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                on_text(text)

    return _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def encode_prompt(tokenizer, prompt: str, *, chat: bool, device) -> dict[str, torch.Tensor]:
    """Token ids (and attention mask) of ``prompt``, through the chat template when ``chat``."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise LightTransferError("--chat: this model's tokenizer has no chat template; drop --chat.")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
    else:
        ids = tokenizer(prompt, return_tensors="pt")
    return {k: v.to(device) for k, v in ids.items() if k in ("input_ids", "attention_mask")}


@torch.no_grad()
def generate_text(
    model,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    chat: bool = False,
    on_text: Callable[[str], None] | None = None,
) -> tuple[str, GenerationStats]:
    """Generate a continuation of ``prompt`` with ``model`` (a :func:`lighttransfer.load` model).

    Args:
        temperature: ``0`` = greedy decoding; above 0, sampling at that temperature.
        top_p: nucleus sampling threshold (with ``temperature > 0``).
        seed: seeds torch's generator first, for reproducible sampling.
        chat: wrap the prompt in the tokenizer's chat template as one user turn.
        on_text: called with each new piece of decoded text as soon as it is final.

    Returns:
        ``(generated text, stats)``.
    """
    if max_new_tokens < 1:
        raise LightTransferError(f"--max-new-tokens must be at least 1, got {max_new_tokens}.")
    if temperature < 0:
        raise LightTransferError(f"--temperature must be 0 (greedy) or more, got {temperature}.")
    if not 0 < top_p <= 1:
        raise LightTransferError(f"--top-p must be in (0, 1], got {top_p}.")
    if not prompt.strip():
        raise LightTransferError("the prompt is empty; pass some text with --prompt or --prompt-file.")
    if seed is not None:
        torch.manual_seed(seed)
    inputs = encode_prompt(tokenizer, prompt, chat=chat, device=model.device)
    warning = check_positions(model.config, int(inputs["input_ids"].shape[1]) + int(max_new_tokens),
                              what=f"the prompt ({inputs['input_ids'].shape[1]} tokens) plus --max-new-tokens",
                              fix="Shorten the prompt or lower --max-new-tokens.")
    if warning:
        log.warning(warning)
    pieces: list[str] = []
    clock: list[float] = []

    def take(text: str) -> None:
        pieces.append(text)
        if on_text is not None:
            on_text(text)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    streamer = _text_streamer(tokenizer, take, clock)
    selection = getattr(getattr(model, RUNTIME_ATTR, None), "selection_stats", None)
    before = (selection.lookups, selection.hits) if selection is not None else (0, 0)
    start = time.perf_counter()
    runtime = getattr(model, RUNTIME_ATTR, None)
    static_reason = options_static_unsupported(runtime.layout.selection, runtime.head_routing) \
        if runtime is not None and runtime.cuda_graphs else None
    if runtime is not None and runtime.cuda_graphs and static_reason is None:
        streamer.put(inputs["input_ids"].cpu())
        out = generate_static(model, inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                              max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              top_k=getattr(model.generation_config, "top_k", None),
                              eos_token_id=model.generation_config.eos_token_id, pad_token_id=pad,
                              cuda_graphs=True, on_tokens=lambda tokens: streamer.put(tokens.cpu()))
        streamer.end()
        sequences, cache, path = out.sequences, out.cache, out.decode_path
    else:
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
            dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer,
                             return_dict_in_generate=True, pad_token_id=pad, **sampling)
        sequences, cache = out.sequences, output_cache(out)
        path = "transformers generate" + (f" (no static steps: {static_reason})" if static_reason else "")
    end = time.perf_counter()
    first = clock[0] if clock else end
    kv = cache.kv_bytes() if isinstance(cache, HybridCache) else 0
    dense = cache.dense_kv_bytes() if isinstance(cache, HybridCache) else 0
    prompt_tokens = inputs["input_ids"].shape[1]
    stats = GenerationStats(prompt_tokens=prompt_tokens, new_tokens=sequences.shape[1] - prompt_tokens,
                            prefill_seconds=first - start, decode_seconds=end - first, kv_bytes=kv,
                            dense_kv_bytes=dense, decode_path=path,
                            selection_lookups=selection.lookups - before[0] if selection is not None else 0,
                            selection_hits=selection.hits - before[1] if selection is not None else 0)
    if path != "transformers generate":
        log.info("decode steps: %s", path)
    return "".join(pieces), stats


__all__ = ["generate_text", "GenerationStats", "encode_prompt"]
