"""Write a model's weights into a checkpoint directory as safetensors, unchanged, and check them.

* safetensors shards are hard-linked (same file system) or copied, with their index;
* ``.bin`` shards are read with ``torch.load(weights_only=True)`` and written as safetensors, one per shard,
  with a ``model.safetensors.index.json`` when there are several;
* an in-memory model (a dequantized GGUF) is written with ``save_pretrained``.

Every function returns the source digests the written files must match; :func:`verify_weights` reads the
files back and compares shape, dtype and the sha256 of each tensor's bytes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LightTransferError
from .verify import TensorDigest, compare_digests, safetensors_digests, tensor_digest

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


@dataclass
class WrittenWeights:
    """What was written and what it must match.

    Attributes:
        files: weight file names (and index files) in the output directory.
        expected: ``{tensor name: digest}`` of the source tensors.
        method: how the weights got there, for the model card (``hard-linked``, ``copied``, ...).
        alias_groups: groups of source names that share one storage (tied weights); transformers writes
            one name per group, so the others may be absent.
        linked: ``{output file: (source path, its digests)}`` for hard-linked shards, whose bytes are the
            source file's own (hashed once).
    """

    files: list[str]
    expected: dict[str, TensorDigest]
    method: str
    alias_groups: list[list[str]] = field(default_factory=list)
    linked: dict[str, tuple[Path, dict[str, TensorDigest]]] = field(default_factory=dict)


def source_weight_files(directory: Path) -> tuple[str, list[str], str | None]:
    """Find the weights of a model directory.

    Returns:
        ``(format, shard file names, index file name or None)`` with format ``safetensors`` or ``bin``;
        safetensors wins when both exist, as in transformers.
    """
    for fmt, index_name, single, patterns in (
        ("safetensors", SAFETENSORS_INDEX, "model.safetensors", ("model*.safetensors", "*.safetensors")),
        ("bin", BIN_INDEX, "pytorch_model.bin", ("pytorch_model*.bin", "model*.bin")),
    ):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise LightTransferError(f"'{index}' is not a valid weight index ({exc}).") from exc
            shards = sorted(set(weight_map.values()))
            absent = [s for s in shards if not (directory / s).is_file()]
            if absent:
                raise LightTransferError(f"'{index}' names shard(s) {absent[:3]} that are not in '{directory}'.")
            return fmt, shards, index_name
        if (directory / single).is_file():
            return fmt, [single], None
        for pattern in patterns:
            found = sorted(p.name for p in directory.glob(pattern) if p.is_file())
            if found:
                return fmt, found, None
    raise LightTransferError(
        f"'{directory}' has no safetensors or pytorch_model*.bin weights; pass a transformers model directory."
    )


def link_or_copy(src: Path, dst: Path) -> str:
    """Hard-link ``src`` to ``dst`` when both are on one file system, else copy it; says which."""
    try:
        os.link(src, dst)
        return "hard-linked"
    except OSError:
        shutil.copyfile(src, dst)
        return "copied"


def write_safetensors_shards(src_dir: Path, dst_dir: Path, shards: list[str], index: str | None) -> WrittenWeights:
    """Link or copy safetensors shards (and their index) unchanged."""
    expected: dict[str, TensorDigest] = {}
    methods, linked = set(), {}
    for name in shards:
        src = src_dir / name
        digests = safetensors_digests(src)
        expected.update(digests)
        how = link_or_copy(src, dst_dir / name)
        methods.add(how)
        if how == "hard-linked":
            linked[name] = (src, digests)
        log.debug("%s %s", how, name)
    files = list(shards)
    if index:
        shutil.copyfile(src_dir / index, dst_dir / index)
        files.append(index)
    method = "hard-linked" if methods == {"hard-linked"} else "copied"
    return WrittenWeights(files, expected, f"{method} from the source's safetensors", linked=linked)


def _bin_to_safetensors_name(name: str) -> str:
    stem = name[: -len(".bin")] if name.endswith(".bin") else name
    if stem.startswith("pytorch_model"):
        stem = "model" + stem[len("pytorch_model"):]
    return stem + ".safetensors"


def _load_bin(path: Path) -> dict:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle errors come in many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise LightTransferError(
            f"could not read '{path}' safely with weights_only=True ({first}); convert it to safetensors with "
            "transformers first."
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LightTransferError(f"'{path}' is not a plain state dict of tensors.")
    return state


def alias_groups(state: dict) -> list[list[str]]:
    """Names of tensors that share one storage (tied weights), in groups of two or more."""
    by_storage: dict[tuple, list[str]] = {}
    for name, t in state.items():
        if t.numel():
            by_storage.setdefault((t.untyped_storage().data_ptr(), t.device.type), []).append(name)
    return [sorted(names) for names in by_storage.values() if len(names) > 1]


def _untie(state: dict) -> dict:
    """Contiguous tensors with no shared storage (safetensors refuses aliases): the second and later names
    of a storage get their own copy."""
    out, seen = {}, set()
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.device.type) if t.numel() else None
        t = t.contiguous()
        if key is not None and key in seen:
            t = t.clone()
        seen.add(key)
        out[name] = t
    return out


def write_bin_as_safetensors(src_dir: Path, dst_dir: Path, shards: list[str]) -> WrittenWeights:
    """Turn ``.bin`` shards into safetensors shards of the same content, one file per shard.

    Tensors that share storage (tied weights) are each written in full, so every source name is present.
    """
    from safetensors.torch import save_file

    expected: dict[str, TensorDigest] = {}
    weight_map: dict[str, str] = {}
    files, total = [], 0
    for shard in shards:
        state = _untie(_load_bin(src_dir / shard))
        out_name = "model.safetensors" if len(shards) == 1 else _bin_to_safetensors_name(shard)
        for name, t in state.items():
            expected[name] = tensor_digest(t)
            weight_map[name] = out_name
            total += t.numel() * t.element_size()
        save_file(state, str(dst_dir / out_name), metadata={"format": "pt"})
        files.append(out_name)
        del state
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dst_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        files.append(SAFETENSORS_INDEX)
    return WrittenWeights(files, expected, "converted from PyTorch .bin shards to safetensors")


def write_model_weights(model, dst_dir: Path) -> WrittenWeights:
    """Save an in-memory model (e.g. a dequantized GGUF) with ``save_pretrained`` as safetensors.

    ``save_pretrained`` also writes ``config.json`` and ``generation_config.json``; callers rewrite the config.
    """
    state = model.state_dict()
    expected = {name: tensor_digest(t) for name, t in state.items()}
    groups = alias_groups(state)
    before = {p.name for p in dst_dir.iterdir()}
    model.save_pretrained(dst_dir)
    files = sorted(p.name for p in dst_dir.iterdir() if p.name not in before and "safetensors" in p.name)
    return WrittenWeights(files, expected, "saved from the dequantized model", alias_groups=groups)


def verify_weights(dst_dir: Path, written: WrittenWeights) -> int:
    """Read every written safetensors file back and compare it with the source digests.

    Returns:
        The number of tensors checked.

    Raises:
        LightTransferError: a tensor is missing, extra, or differs in shape, dtype or bytes.
    """
    got: dict[str, TensorDigest] = {}
    for name in written.files:
        if not name.endswith(".safetensors"):
            continue
        linked = written.linked.get(name)
        if linked is not None and os.path.samefile(linked[0], dst_dir / name):
            # a hard link is the source file itself, whose bytes were just hashed for the expected digests
            got.update(linked[1])
            continue
        got.update(safetensors_digests(dst_dir / name))
    optional: set[str] = set()
    for group in written.alias_groups:
        present = [n for n in group if n in got]
        if not present:
            raise LightTransferError(f"none of the tied tensors {group} was written.")
        optional.update(n for n in group if n not in got)
    return compare_digests(written.expected, got, where=f"checking '{dst_dir.name}'", may_be_missing=optional)


__all__ = [
    "WrittenWeights",
    "source_weight_files",
    "link_or_copy",
    "write_safetensors_shards",
    "write_bin_as_safetensors",
    "write_model_weights",
    "verify_weights",
]
