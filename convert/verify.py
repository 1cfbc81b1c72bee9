"""Tensor fingerprints for checking a written checkpoint against its source, byte for byte.

A *digest* is ``(shape, dtype, sha256 of the tensor's raw bytes)``. For a safetensors file it is read straight
from the file (header + byte range, no framework involved), so the check covers exactly what was written; for
an in-memory ``torch.Tensor`` it is computed from its contiguous bytes.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import LightTransferError

# safetensors dtype codes <-> torch dtype names
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "U16": "uint16", "U32": "uint32", "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
_CHUNK = 1 << 24  # 16 MiB reads keep memory flat on multi-GB shards


@dataclass(frozen=True)
class TensorDigest:
    """What must match between a source tensor and the written one."""

    shape: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "bfloat16"
    sha256: str


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data starts."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as exc:
        raise LightTransferError(f"'{path}' is not a readable safetensors file ({exc}).") from exc
    header.pop("__metadata__", None)
    return header, 8 + size


def safetensors_digests(path: Path) -> dict[str, TensorDigest]:
    """``{name: TensorDigest}`` for every tensor of a safetensors file, hashed from the file's bytes."""
    header, base = read_safetensors_header(path)
    digests = {}
    with open(path, "rb") as f:
        for name, info in header.items():
            start, end = info["data_offsets"]
            f.seek(base + start)
            h = hashlib.sha256()
            left = end - start
            while left > 0:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    raise LightTransferError(f"'{path}' is truncated inside tensor '{name}'.")
                h.update(chunk)
                left -= len(chunk)
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"], info["dtype"])
            digests[name] = TensorDigest(tuple(info["shape"]), dtype, h.hexdigest())
    return digests


def tensor_digest(tensor) -> TensorDigest:
    """Digest of an in-memory tensor (any device), from its contiguous CPU bytes."""
    import torch

    t = tensor.detach().to("cpu").contiguous()
    raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    h = hashlib.sha256(raw.numpy())
    return TensorDigest(tuple(t.shape), str(t.dtype).removeprefix("torch."), h.hexdigest())


def compare_digests(
    expected: dict[str, TensorDigest],
    written: dict[str, TensorDigest],
    *,
    where: str,
    may_be_missing: set[str] = frozenset(),
) -> int:
    """Raise unless every expected tensor was written with the same shape, dtype and bytes.

    Args:
        expected: digests of the source tensors.
        written: digests read back from the output files.
        where: what is being checked, for the error message.
        may_be_missing: source names allowed to be absent (tied weights that transformers does not save).

    Returns:
        The number of tensors checked.
    """
    missing = sorted(set(expected) - set(written) - set(may_be_missing))
    if missing:
        raise LightTransferError(f"{where}: tensor(s) {missing[:3]} missing from the written checkpoint.")
    extra = sorted(set(written) - set(expected))
    if extra:
        raise LightTransferError(f"{where}: written checkpoint has tensor(s) {extra[:3]} the source lacks.")
    for name, got in written.items():
        want = expected[name]
        if got != want:
            what = "shape" if got.shape != want.shape else "dtype" if got.dtype != want.dtype else "bytes"
            raise LightTransferError(
                f"{where}: tensor '{name}' differs from the source ({what}); the disk or the copy is faulty."
            )
    return len(written)


__all__ = ["TensorDigest", "read_safetensors_header", "safetensors_digests", "tensor_digest", "compare_digests"]
