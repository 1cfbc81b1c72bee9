"""What the kernels share on the host: the shared-memory limits every tile filter uses and the autotune switch
(the prefill kernels too); for both split-K decode kernels also their config candidates, the shared-memory filter,
and the autotuned launcher built once per (GPU, head size, query rows) — the ring-buffer kernel of
:mod:`.decode_triton` and the contiguous full-layer kernel of :mod:`.full_decode_triton`."""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton


def decode_config(block_n: int, warps: int, stages: int) -> triton.Config:
    """One candidate: ``BLOCK_N`` keys per tile, ``warps`` warps, ``stages`` pipeline stages."""
    return triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


FALLBACK_CONFIG = decode_config(64, 4, 2)
# ever smaller tiles for when even the fallback does not fit (fp32 at head size 256: 278 KB with 64-key tiles)
_SMALLER_FALLBACKS = (decode_config(32, 4, 2), decode_config(16, 4, 1))
INTERPRETER_CONFIG = decode_config(16, 1, 1)
HOPPER_SHARED_MEMORY = 227 * 1024
# what every CUDA GPU since Ampere offers a block (the consumer parts' 99 KB), for GPUs other than Hopper
OTHER_SHARED_MEMORY = 99 * 1024
# Triton's own scratch beside the K/V tiles (measured: ~5 KB more than the tiles at fp32, head size 256)
SHARED_MEMORY_MARGIN = 8 * 1024


def shared_memory(config: triton.Config, block_d: int, block_m: int, element_bytes: int = 2) -> int:
    """Bytes of shared memory a config's Q tile and pipelined K/V tiles take (elements of ``element_bytes``)."""
    bn = config.kwargs["BLOCK_N"]
    return element_bytes * (block_m * block_d + config.num_stages * 2 * bn * block_d)


def fits_hopper(config: triton.Config, block_d: int, block_m: int, element_bytes: int = 2,
                limit: int = HOPPER_SHARED_MEMORY) -> bool:
    """Keep configs whose tiles fit ``limit`` bytes of shared memory per block (the H100/H200's 227 KB) with
    Triton's margin, and no wide key tiles at head sizes above 128 (their registers spill)."""
    bn = config.kwargs["BLOCK_N"]
    used = shared_memory(config, block_d, block_m, element_bytes) + SHARED_MEMORY_MARGIN
    return used <= limit and not (block_d > 128 and bn > 64)


def fallback_config(block_d: int, block_m: int, element_bytes: int = 2,
                    limit: int = OTHER_SHARED_MEMORY) -> triton.Config:
    """The fallback config, or the first smaller one that fits ``limit`` (the smallest when none does)."""
    chain = (FALLBACK_CONFIG, *_SMALLER_FALLBACKS)
    return next((c for c in chain if fits_hopper(c, block_d, block_m, element_bytes, limit)), chain[-1])


def hopper_candidates(hopper_configs: list[triton.Config], block_d: int, block_m: int,
                      element_bytes: int = 2) -> list[triton.Config]:
    """The candidates a Hopper GPU times: those that fit, else the first fallback that does."""
    return [c for c in hopper_configs if fits_hopper(c, block_d, block_m, element_bytes)] \
        or [fallback_config(block_d, block_m, element_bytes, HOPPER_SHARED_MEMORY)]


def autotune_enabled() -> bool:
    """``LIGHTTRANSFER_TRITON_AUTOTUNE=0`` launches each GPU's first candidate instead of timing them all."""
    return os.environ.get("LIGHTTRANSFER_TRITON_AUTOTUNE", "1") != "0"


def tuned_launcher(kernel, hopper_configs: list[triton.Config], capability: tuple[int, int], block_d: int,
                   block_m: int, autotune: bool, element_bytes: int = 2,
                   key: tuple[str, ...] = ("HEAD_DIM", "BLOCK_M", "SINGLE_SPLIT")):
    """``kernel`` autotuned over the candidates that fit (Hopper), or the fallback config (other GPUs); only the
    first candidate when ``autotune`` is off. Keyed on the kernel's arguments named in ``key`` (default
    ``HEAD_DIM``, ``BLOCK_M``, ``SINGLE_SPLIT``); the caller builds one per element size (fp32 tiles take twice
    the shared memory of bf16 ones)."""
    if capability[0] == 9:
        configs = hopper_candidates(hopper_configs, block_d, block_m, element_bytes)
    else:
        configs = [fallback_config(block_d, block_m, element_bytes)]
    if not autotune:
        configs = configs[:1]
    return triton.autotune(configs=configs, key=list(key))(kernel)


def device_index(t: torch.Tensor) -> int:
    """The CUDA device index of ``t`` (the current device for a bare ``cuda``)."""
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def launch_device(t: torch.Tensor):
    """The context to launch a kernel on ``t``'s device in: ``t``'s CUDA device, or nothing for a CPU tensor (the
    interpreter)."""
    return torch.cuda.device(device_index(t)) if t.is_cuda else contextlib.nullcontext()


def int8_flags(flags: torch.Tensor, device) -> torch.Tensor:
    """A bool (or integer) ``[R]`` flag vector as the kernels read it, int8 contiguous on ``device``: a bool
    tensor is viewed as int8 (no copy, no launch: the decode step's hit flags are made that way)."""
    flags = flags.to(device=device)
    flags = flags.view(torch.int8) if flags.dtype == torch.bool else flags.to(torch.int8)
    return flags.contiguous()


@functools.cache
def capability(index: int) -> tuple[int, int]:
    """Compute capability of CUDA device ``index`` (read once)."""
    return torch.cuda.get_device_capability(index)


@functools.cache
def multiprocessors(index: int) -> int:
    """SM count of CUDA device ``index`` (read once)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


__all__ = ["decode_config", "fits_hopper", "fallback_config", "hopper_candidates", "shared_memory",
           "HOPPER_SHARED_MEMORY", "OTHER_SHARED_MEMORY", "SHARED_MEMORY_MARGIN", "autotune_enabled", "tuned_launcher",
           "capability", "multiprocessors", "device_index", "launch_device", "int8_flags", "FALLBACK_CONFIG", "INTERPRETER_CONFIG"]
