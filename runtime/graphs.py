"""Decode steps of fixed shape over a :class:`HybridCache`, replayed from one captured CUDA graph.

At batch 1 a decode step of an 8B model reads ~16 GB in ~3.5 ms on an H200, but launching its ~2000 kernels from
Python takes longer than that. The cure (gpt-fast's, vLLM's) is to record the step once and replay it: a CUDA graph
fixes every kernel, its grid and every pointer, so the step must have the same shapes and buffers at every token
and read nothing from the host. :meth:`HybridCache.begin_static` makes the cache so:

* full layers (and the full heads of mixed layers) hold storage reserved for the whole generation (prompt +
  ``max_new_tokens``) and write the new token at a device-side index; their attention reads the live length from
  device memory, the split-K kernel's grid planned for the reserved length (programs past it exit at once);
* streaming layers hold all ``sink + window`` slots from the start and scatter the new token into its ring slot,
  computed on the device;
* the index, the live length and each sequence's position (:class:`~lighttransfer.runtime.cache_state.StaticStep`)
  live in device tensors that the step itself moves on by one token.

:class:`StaticDecoder` runs such steps: eagerly where no graph can be captured (the CPU, ``cuda_graphs=False``, a
failed capture; the reason is kept in :attr:`StaticDecoder.reason`), otherwise one eager warm-up step (kernels
compile and autotune), then one capture, then one replay per token. A graph belongs to one cache, i.e. to one
(batch, reserved length, padded or not): :meth:`StaticDecoder.reuse` copies a new generation's prefilled cache into
that cache's storage, so the graph captured once serves every later generation of the same shape
(:func:`~lighttransfer.runtime.generate_static` keeps such decoders on the model's runtime).
"""

from __future__ import annotations

import inspect
import logging

import torch

from ..compat import cache_keyword
from ..errors import LightTransferError
from .cache import HybridCache

log = logging.getLogger(__name__)

# eager steps before the capture: the first compiles and autotunes every kernel at the step's shapes
WARMUP_STEPS = 1


def graphs_unsupported(cache: HybridCache, device: torch.device) -> str | None:
    """Why the static steps of ``cache`` on ``device`` must run eagerly, or ``None`` when a graph can be captured."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, the model is on {device.type}"
    return cache.static_unsupported()


class StaticDecoder:
    """One-token decode steps of fixed shape for ``cache``, captured in a CUDA graph where possible.

    Args:
        model: a model prepared by :func:`lighttransfer.load` (or :func:`~lighttransfer.runtime.enable_hybrid`).
        cache: its :class:`HybridCache`, holding the prefilled prompt.
        tokens: tokens per sequence to reserve (prompt + every token still to come); a step beyond it is refused.
        cuda_graphs: capture and replay a graph (``False``: the same static steps, eagerly).

    Call it with the tokens ``[batch, 1]`` (or ``[batch]``) to feed; it returns the next-token logits
    ``[batch, vocab]``. With a graph, the returned tensor is the graph's output buffer, overwritten by the next call:
    read (or clone) it first. :meth:`close` hands the cache back to the dynamic path.
    """

    def __init__(self, model, cache: HybridCache, *, tokens: int, cuda_graphs: bool = True) -> None:
        if not isinstance(cache, HybridCache):
            raise LightTransferError("static decode steps need the runtime's HybridCache (lighttransfer.make_cache).")
        device = next(model.parameters()).device
        self.reason = graphs_unsupported(cache, device) if cuda_graphs else "cuda_graphs is off"
        self.model, self.cache, self.tokens_reserved = model, cache, int(tokens)
        self.step = cache.begin_static(tokens)
        batch = self.step.q_pos.shape[0]
        self.input_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.kwargs = {cache_keyword(model): cache, "use_cache": True, "position_ids": self.step.q_pos}
        if "cache_position" in inspect.signature(type(model).forward).parameters:
            # transformers < 5.24 derives it from the host-side length when not given: give the device's
            self.kwargs["cache_position"] = self.step.index
        self.graph: torch.cuda.CUDAGraph | None = None
        self._graph_logits: torch.Tensor | None = None
        self.eager_steps = 0

    @property
    def path(self) -> str:
        """How the steps run: ``cuda graph`` or ``eager (<reason>)``."""
        if self.graph is not None:
            return "cuda graph"
        return f"eager ({self.reason})" if self.reason else "eager (warming up)"

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.cache.get_seq_length() >= self.tokens_reserved:
            raise LightTransferError(f"the cache was reserved for {self.tokens_reserved} tokens per sequence and "
                                     "holds them all; reserve more (max_new_tokens) for a longer generation.")
        self.input_ids.copy_(input_ids.view(-1, 1))
        if self.graph is not None:
            self.graph.replay()
            logits = self._graph_logits
        elif self.reason is None and self.eager_steps >= WARMUP_STEPS:
            logits = self._capture()
        else:
            logits = self._warmup() if self.reason is None else self._forward()
            self.eager_steps += 1
        self.cache.advance(1)
        return logits

    def compatible(self, cache: HybridCache) -> bool:
        """Whether :meth:`reuse` can take ``cache``: the same layer kinds and head split, batch and left padding
        (the capture recorded the padding's masking or not), and room for one more token."""
        mine, theirs = self.cache, cache
        return (isinstance(theirs, HybridCache) and theirs.static_unsupported() is None
                and [type(a) for a in mine.layers] == [type(b) for b in theirs.layers]
                and all(getattr(a, "kv_mask", None) == getattr(b, "kv_mask", None)
                        for a, b in zip(mine.layers, theirs.layers, strict=True))
                and theirs.sequence.kv_start is not None
                and theirs.sequence.kv_start.shape == self.step.q_pos.shape[:1]
                and theirs.sequence.has_padding == mine.sequence.has_padding
                and theirs.get_seq_length() < self.tokens_reserved)

    def reuse(self, cache: HybridCache) -> None:
        """Serve a new generation: ``cache`` (a fresh prefill, :meth:`compatible`) is copied into this decoder's
        own cache, whose storage, slots and counters the captured graph reads; decode on with this decoder (and
        its :attr:`cache`) from here on."""
        if not self.compatible(cache):
            raise LightTransferError("this captured decode step cannot serve that cache (another layout, batch, "
                                     "padding or length); make a new StaticDecoder.")
        self.cache.load_from(cache)
        step = self.cache.begin_static(self.tokens_reserved)
        assert step is self.step  # the tensors the graph was captured on

    def pause(self) -> None:
        """Return the cache to dynamic steps (its views cover the tokens held again), keeping the graph for
        :meth:`reuse`."""
        self.cache.end_static()

    def close(self) -> None:
        """Drop the graph and return the cache to dynamic steps (its views cover the tokens held again)."""
        self.graph = self._graph_logits = None
        self.cache.end_static()

    # ---- internals -------------------------------------------------------------------------------------------
    def _forward(self) -> torch.Tensor:
        out = self.model(input_ids=self.input_ids, **self.kwargs)
        self.step.advance()
        return out.logits[:, -1]

    def _warmup(self) -> torch.Tensor:
        # on a side stream, as torch.cuda.graph's recipe asks: what a library sets up per stream on first use
        # (workspaces, handles) is then not first set up inside the capture
        current = torch.cuda.current_stream(self.input_ids.device)
        side = torch.cuda.Stream(self.input_ids.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            logits = self._forward()
        current.wait_stream(side)
        return logits

    def _capture(self) -> torch.Tensor:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                logits = self._forward()  # recorded, not run: the counters move at the replay below
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager steps
            self.reason = f"capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            log.warning("CUDA graph %s; decoding eagerly", self.reason)
            torch.cuda.synchronize(self.input_ids.device)
            return self._forward()
        self.graph, self._graph_logits = graph, logits
        log.info("decode step captured in a CUDA graph (batch %d, %d tokens reserved)", self.input_ids.shape[0],
                 self.tokens_reserved)
        graph.replay()
        return logits


__all__ = ["StaticDecoder", "graphs_unsupported", "WARMUP_STEPS"]
