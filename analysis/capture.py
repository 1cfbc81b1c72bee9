"""Capture each layer's lazy mass from a model's own post-RoPE queries and keys, during a normal forward.

:func:`capture_lazy_mass` registers an attention function with transformers' ``AttentionInterface`` under a
name of ours (and the matching mask function with ``AttentionMaskInterface``), switches the model's
``config._attn_implementation`` to it, and restores the original on exit. The function computes the
statistics from the last ``last`` query rows and all keys (:func:`~.lazy_ratio.streaming_attention_mass`),
then hands the call to the model's original implementation (``sdpa``, ``eager``, flash, ...), so the
forward's outputs are unchanged. Tensors stay on the layer's device (``device_map="auto"`` models spread over
several GPUs work); results are moved to the CPU once per forward.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch

from ..errors import LightTransferError
from .lazy_ratio import DEFAULT_BLOCK, stats_workspace_bytes, streaming_attention_mass

log = logging.getLogger(__name__)

NAME_PREFIX = "lighttransfer_lazy_capture_"
_active: ContextVar[object | None] = ContextVar("lighttransfer_lazy_capture", default=None)


class LazyMassRecorder:
    """Collects, per layer, the lazy mass ``[batch, q_heads, last]`` (fp32) of the current forward pass."""

    def __init__(self, *, last: int, sink: int, window: int, block_size: int = DEFAULT_BLOCK) -> None:
        self.last = last
        self.sink = sink
        self.window = window
        self.block_size = block_size
        self.peak_workspace_bytes = 0
        self._mass: dict[int, torch.Tensor] = {}
        self._order: dict[int, int] = {}  # id(module) -> layer, for modules without ``layer_idx``
        self._warned_window = False

    def record(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               kwargs: dict) -> None:
        """Compute the lazy mass of the last ``last`` queries of ``query [batch, q_heads, q_len, head_dim]``
        against ``key [batch, kv_heads, k_len, head_dim]`` (queries are the last ``q_len`` positions; the values
        play no part)."""
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            layer = self._order.setdefault(id(module), len(self._order))
        q_len, k_len = query.shape[2], key.shape[2]
        n = min(self.last, q_len)
        scale = kwargs.get("scaling")
        if scale is None:
            scale = getattr(module, "scaling", query.shape[-1] ** -0.5)
        native = kwargs.get("sliding_window")
        with torch.no_grad():
            if native and k_len - n - int(native) + 1 > 0:
                mass = self._native_window_mass(query[:, :, q_len - n :], key, int(native), float(scale), kwargs)
            else:
                mass = streaming_attention_mass(
                    query[:, :, q_len - n :], key, q_offset=k_len - n, sink=self.sink, window=self.window,
                    scale=float(scale), softcap=kwargs.get("softcap"), block_size=self.block_size,
                )
        self._mass[int(layer)] = mass
        b, h, _, d = query.shape
        self.peak_workspace_bytes = max(
            self.peak_workspace_bytes,
            stats_workspace_bytes(batch=b, q_heads=h, q_len=n, head_dim=d, k_len=k_len, block_size=self.block_size),
        )

    def _native_window_mass(self, q: torch.Tensor, key: torch.Tensor, window: int, scale: float, kwargs) -> torch.Tensor:
        """Lazy mass of a layer that slides the model's own ``window``: each of the queries ``q [b, h, n, d]`` (the
        last ``n`` positions) against the keys it can see, ``(p - window, p]``, which hold no sink tokens."""
        if not self._warned_window:
            log.warning("some layers slide the model's own window; their lazy ratios are measured inside it "
                        "(no sink), and convert leaves them alone")
            self._warned_window = True
        n, k_len = q.shape[2], key.shape[2]
        out = []
        for i in range(n):
            p = k_len - n + i
            lo = max(0, p - window + 1)
            out.append(streaming_attention_mass(q[:, :, i : i + 1], key[:, :, lo : p + 1], q_offset=p - lo, sink=0,
                                                window=self.window, scale=scale, softcap=kwargs.get("softcap"),
                                                block_size=self.block_size))
        return torch.cat(out, dim=-1)

    def take(self) -> torch.Tensor:
        """The lazy mass of every layer of the last forward, ``[layers, batch, q_heads, last]`` fp32 on the
        CPU; clears the recorder for the next forward."""
        if not self._mass:
            raise LightTransferError(
                "no attention call was captured: the model does not route attention through transformers' "
                "attention interface."
            )
        layers = sorted(self._mass)
        if layers != list(range(len(layers))):
            raise RuntimeError(f"captured layers {layers} are not 0..{len(layers) - 1}")
        out = torch.stack([self._mass[i].to("cpu", non_blocking=False) for i in layers])
        self._mass.clear()
        return out


def _eager_attention_of(module: torch.nn.Module) -> Callable:
    """The eager attention function of the module's own modeling file (every transformers model has one)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise LightTransferError(
            f"cannot find the eager attention of {type(module).__name__}; load the model with "
            "attn_implementation='sdpa'."
        )
    return fn


def _capture_function(original: str) -> Callable:
    from transformers import AttentionInterface

    def capture_then_attend(module, query, key, value, attention_mask, **kwargs):
        recorder = _active.get()
        if recorder is not None:
            recorder.record(module, query, key, value, kwargs)
        if original == "eager":
            attend = _eager_attention_of(module)
        else:
            attend = AttentionInterface._global_mapping[original]
        return attend(module, query, key, value, attention_mask, **kwargs)

    return capture_then_attend


def _register(original: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    name = NAME_PREFIX + original
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _capture_function(original))
    mask_fn = AttentionMaskInterface._global_mapping.get(original)
    if mask_fn is None:
        raise LightTransferError(
            f"attention implementation '{original}' has no mask function in transformers; load the model "
            "with attn_implementation='sdpa' or 'eager'."
        )
    AttentionMaskInterface.register(name, mask_fn)
    return name


def attention_configs(model: torch.nn.Module) -> list:
    """The distinct transformers configs inside ``model`` that choose an attention implementation (a
    composite model has one per sub-model)."""
    seen: dict[int, object] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            seen.setdefault(id(config), config)
    return list(seen.values())


class CaptureComplete(Exception):
    """Raised by a recorder's ``record`` when it needs nothing more from the forward: the rest of the forward (the
    layers above, their attention included) never runs. :func:`forward_captured` ends such a forward quietly."""


def forward_captured(model: torch.nn.Module, *args, **kwargs) -> None:
    """``model(*args, **kwargs)`` inside :func:`capture_attention`, for what the recorder collects: it returns
    nothing, because a recorder that raised :class:`CaptureComplete` has ended the forward before any output."""
    try:
        model(*args, **kwargs)
    except CaptureComplete:
        pass


@contextlib.contextmanager
def capture_attention(model: torch.nn.Module, recorder) -> Iterator:
    """Within the block, every attention call of ``model`` first hands ``(module, query, key, value, kwargs)``
    (post-RoPE ``query [batch, q_heads, q_len, head_dim]``, ``key, value [batch, kv_heads, k_len, head_dim]``) to
    ``recorder.record``, then runs the model's own implementation; the implementation is restored on exit, also
    when the block raises. ``record`` may raise :class:`CaptureComplete` to end the forward early (run it with
    :func:`forward_captured`). Yields ``recorder``."""
    configs = attention_configs(model)
    if not configs:
        raise LightTransferError("the model has no transformers config; pass a transformers causal LM.")
    originals = [c._attn_implementation for c in configs]
    if any(str(o).startswith(NAME_PREFIX) for o in originals):
        raise LightTransferError("this model is already being analysed; analyses cannot be nested.")
    names = {o: _register(o or "eager") for o in set(originals)}
    token = _active.set(recorder)
    try:
        for config, original in zip(configs, originals, strict=True):
            config._attn_implementation = names[original]
        yield recorder
    finally:
        for config, original in zip(configs, originals, strict=True):
            config._attn_implementation = original
        _active.reset(token)


@contextlib.contextmanager
def capture_lazy_mass(
    model: torch.nn.Module, *, last: int, sink: int, window: int, block_size: int = DEFAULT_BLOCK
) -> Iterator[LazyMassRecorder]:
    """Within the block, every forward of ``model`` records each layer's lazy mass in the yielded recorder.

    The model's attention implementation is restored on exit, also when the block raises.
    """
    recorder = LazyMassRecorder(last=last, sink=sink, window=window, block_size=block_size)
    with capture_attention(model, recorder):
        yield recorder


__all__ = ["CaptureComplete", "LazyMassRecorder", "capture_lazy_mass", "capture_attention", "forward_captured"]
