"""Which implementation runs: the Triton kernels or the plain PyTorch references.

The Triton path is taken for CUDA tensors, and for CPU tensors when ``TRITON_INTERPRET=1`` (Triton's interpreter,
which is how CPU-only CI exercises the kernel code). Everything else, and everything inside
``use_reference()``, runs the references, so an A/B comparison needs nothing but a flag.
"""

from __future__ import annotations

import functools
import os

import torch

_FORCE_REFERENCE = False


class use_reference:  # noqa: N801 - reads as a function at call sites
    """Force the PyTorch references everywhere (``enabled=True``) or restore kernel dispatch (``False``).

    Works as a plain call (the setting stays until changed) and as a context manager (the previous setting
    comes back on exit)::

        use_reference()               # from now on, references only
        with use_reference():         # references inside the block only
            ...
    """

    def __init__(self, enabled: bool = True) -> None:
        global _FORCE_REFERENCE
        self._previous = _FORCE_REFERENCE
        _FORCE_REFERENCE = bool(enabled)

    def __enter__(self) -> use_reference:
        return self

    def __exit__(self, *exc) -> None:
        global _FORCE_REFERENCE
        _FORCE_REFERENCE = self._previous


def reference_forced() -> bool:
    """Whether ``use_reference`` currently forces the PyTorch references."""
    return _FORCE_REFERENCE


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_runs_on(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels should handle ``tensor`` (CUDA, or CPU under the interpreter)."""
    if _FORCE_REFERENCE or not triton_available():
        return False
    if tensor.is_cuda:
        return True
    return tensor.device.type == "cpu" and interpreter_enabled()


__all__ = ["use_reference", "reference_forced", "triton_runs_on", "interpreter_enabled", "triton_available"]
