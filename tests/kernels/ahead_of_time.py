"""Compile a Triton kernel for a GPU that is not there, to read what the compiled kernel needs (shared memory).

On a CPU-only machine the kernels run in Triton's interpreter, which has no shared memory, so a configuration
that needs more than the GPU has passes every CPU test and fails at its first launch on the GPU
(``OutOfResources: shared memory``). Triton's wheels ship ``ptxas``, so a kernel can still be compiled for
sm_90 on the CPU: its metadata then says how many bytes of shared memory one program takes.

:func:`captured_launch` runs a launcher on CPU tensors up to its kernel launch and records the arguments
(the CPU's configuration); :func:`shared_bytes` compiles the kernel with those argument types and the
constexprs and launch options of the configuration the GPU would take.
"""

from __future__ import annotations

import contextlib
import inspect
import shutil
from pathlib import Path

import pytest
import torch
import triton

_POINTER_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
                  torch.int32: "*i32", torch.int64: "*i64", torch.bool: "*i1", torch.int8: "*i8", torch.uint8: "*u8"}


class _Launched(Exception):
    """Raised in place of the launch, to stop the launcher there."""


def python_function(kernel):
    """The Python function under a ``@triton.jit`` kernel (a JITFunction, or the interpreter's wrapper)."""
    return getattr(kernel, "fn", kernel)


def ptxas_or_skip() -> None:
    """Skip when this Triton cannot compile for NVIDIA GPUs here (no NVIDIA backend or no ``ptxas``)."""
    try:
        from triton.backends.nvidia import compiler as nvidia  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"this Triton has no NVIDIA backend ({exc})")
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not bundled.is_file() and shutil.which("ptxas") is None:
        pytest.skip("no ptxas (neither bundled with Triton nor on PATH)")


@contextlib.contextmanager
def captured_launch(kernel):
    """Inside the block, launching ``kernel`` records ``(args, kwargs)`` in the yielded list and stops the
    launcher with :class:`_Launched` (caught here)."""
    calls: list[tuple[tuple, dict]] = []

    def record(*args, grid=None, warmup=False, **kwargs):
        calls.append((args, kwargs))
        raise _Launched

    original = kernel.run
    kernel.run = record
    try:
        with contextlib.suppress(_Launched):
            yield calls
    finally:
        kernel.run = original


def _type_of(value) -> str:
    if isinstance(value, torch.Tensor):
        return _POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def shared_bytes(kernel, args: tuple, kwargs: dict, *, overrides: dict | None = None, num_warps: int = 4,
                 num_stages: int = 3, capability: int = 90) -> int:
    """Bytes of shared memory one program of ``kernel`` takes when compiled for ``sm_<capability>``.

    ``args``/``kwargs``: a launch as :func:`captured_launch` recorded it (the launch options in ``kwargs``,
    e.g. the interpreter's ``num_warps``, are dropped); ``overrides``: constexprs replaced by those of the GPU's
    configuration (``BLOCK_N``, ...). Pointers and integer arguments are compiled as divisible by 16, as the
    JIT specializes them for aligned tensors and strides, so the pipelined copies are those of the real launch.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = python_function(kernel)
    params = list(inspect.signature(fn).parameters.values())
    constexpr_names = {p.name for p in params if "constexpr" in str(p.annotation)}
    values = dict(zip([p.name for p in params][:len(args)], args, strict=True))
    values.update({k: v for k, v in kwargs.items() if k in {p.name for p in params}})
    values.update(overrides or {})
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(params):
        if param.name not in values:
            if param.default is inspect.Parameter.empty:
                raise TypeError(f"{fn.__name__}: no value for {param.name}")
            values[param.name] = param.default
        value = values[param.name]
        if param.name in constexpr_names:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
            continue
        signature[param.name] = _type_of(value)
        if isinstance(value, torch.Tensor) or (isinstance(value, int) and not isinstance(value, bool)
                                               and value % 16 == 0):
            attrs[(index,)] = [["tt.divisibility", 16]]
    jit = kernel if isinstance(kernel, triton.runtime.jit.JITFunction) else triton.runtime.jit.JITFunction(fn)
    source = ASTSource(fn=jit, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    return int(compiled.metadata.shared)


__all__ = ["captured_launch", "ptxas_or_skip", "python_function", "shared_bytes"]
