"""What a result records about where it was measured: the software versions and the device.

Every report, evaluation and benchmark stores this beside its numbers, so that a result names its GPU (or CPU)
and versions without anyone having to remember them.
"""

from __future__ import annotations

import platform
import subprocess
from typing import Any


def software_versions() -> dict[str, Any]:
    """Versions of lighttransfer, Python, torch, transformers and Triton (``None`` where not installed)."""
    import torch
    import transformers

    from . import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover - triton is a dependency
        triton_version = None
    return {"lighttransfer": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "triton": triton_version}


def device_facts(device=None) -> dict[str, Any]:
    """The device a run used: a GPU's name, capability, SM count, memory and CUDA version; else the CPU's name
    and torch's thread count. ``device``: a ``torch.device`` or string (``None``: the current CUDA device when
    there is one)."""
    import torch

    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    facts: dict[str, Any] = {"device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                     gpu_memory_bytes=int(props.total_memory), cuda=torch.version.cuda)
    else:
        facts.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return facts


def gpu_driver() -> str:
    """The NVIDIA driver version from ``nvidia-smi``, or ``unknown``."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout
        return out.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def environment(device=None) -> dict[str, Any]:
    """:func:`software_versions` and :func:`device_facts` in one dict."""
    return {**software_versions(), **device_facts(device)}


__all__ = ["software_versions", "device_facts", "gpu_driver", "environment"]
