"""What both split-K decode kernels share on the host: their config candidates, the shared-memory filter, and the
autotuned launcher built once per (GPU, head size, query rows) — the ring-buffer kernel of
:mod:`.decode_triton` and the contiguous full-layer kernel of :mod:`.full_decode_triton`."""

from __future__ import annotations

import functools
import os

import torch
import triton


def decode_config(block_n: int, warps: int, stages: int) -> triton.Config:
    """One candidate: ``BLOCK_N`` keys per tile, ``warps`` warps, ``stages`` pipeline stages."""
    return triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


FALLBACK_CONFIG = decode_config(64, 4, 2)
INTERPRETER_CONFIG = decode_config(16, 1, 1)


def fits_hopper(config: triton.Config, block_d: int, block_m: int) -> bool:
    """Keep configs whose pipelined K/V tiles fit the H100's 227 KB of shared memory per block."""
    bn = config.kwargs["BLOCK_N"]
    smem = 2 * (block_m * block_d + config.num_stages * 2 * bn * block_d)
    return smem <= 227 * 1024 and not (block_d > 128 and bn > 64)


def autotune_enabled() -> bool:
    """``LIGHTTRANSFER_TRITON_AUTOTUNE=0`` launches each GPU's first candidate instead of timing them all."""
    return os.environ.get("LIGHTTRANSFER_TRITON_AUTOTUNE", "1") != "0"


def tuned_launcher(kernel, hopper_configs: list[triton.Config], capability: tuple[int, int], block_d: int,
                   block_m: int, autotune: bool):
    """``kernel`` autotuned over the candidates that fit (Hopper), or the fallback config (other GPUs); only the
    first candidate when ``autotune`` is off. Keyed on the kernel's ``HEAD_DIM``, ``BLOCK_M``, ``SINGLE_SPLIT``."""
    if capability[0] == 9:
        configs = [c for c in hopper_configs if fits_hopper(c, block_d, block_m)] or [FALLBACK_CONFIG]
    else:
        configs = [FALLBACK_CONFIG]
    if not autotune:
        configs = configs[:1]
    return triton.autotune(configs=configs, key=["HEAD_DIM", "BLOCK_M", "SINGLE_SPLIT"])(kernel)


@functools.cache
def capability(index: int) -> tuple[int, int]:
    """Compute capability of CUDA device ``index`` (read once)."""
    return torch.cuda.get_device_capability(index)


@functools.cache
def multiprocessors(index: int) -> int:
    """SM count of CUDA device ``index`` (read once)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


__all__ = ["decode_config", "fits_hopper", "autotune_enabled", "tuned_launcher", "capability", "multiprocessors",
           "FALLBACK_CONFIG", "INTERPRETER_CONFIG"]
