"""What a GGUF file says about its tokenizer and license, beyond what transformers' GGUF loader keeps.

transformers' GGUF loader rebuilds the vocabulary and merges but (in the releases we use) drops the chat
template and the special-token roles, so a tokenizer saved from it would lose them. The GGUF keys
``tokenizer.chat_template`` and ``tokenizer.ggml.{bos,eos,unknown,padding}_token_id`` restore them.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

_SPECIAL_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}
_KEYS = (*_SPECIAL_IDS.values(), "tokenizer.chat_template", "general.license", "general.name")


# GGUF value types: fixed-size scalars as struct codes; 8 = string, 9 = array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def read_gguf_metadata(path: Path, keys: tuple[str, ...] = _KEYS) -> dict[str, Any]:
    """The metadata values of ``keys`` (missing keys are left out); ``{}`` when the file cannot be read.

    Reads only the key/value section of the header and skips the big arrays (vocabulary, merges) without
    decoding them, which ``gguf.GGUFReader`` would do for every field.
    """
    try:
        with open(path, "rb") as f:
            return _read_kv(f, set(keys))
    except (OSError, ValueError, struct.error) as exc:  # metadata is a nicety; the weights were read already
        log.warning("could not read metadata from %s (%s)", path.name, exc)
        return {}


def _read_kv(f: BinaryIO, wanted: set[str]) -> dict[str, Any]:
    def unpack(fmt: str):
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, f.read(size))[0]

    def string() -> str:
        return f.read(unpack("Q")).decode("utf-8", errors="replace")

    def value(kind: int, keep: bool):
        if kind in _SCALARS:
            return unpack(_SCALARS[kind])
        if kind == _STRING:
            if keep:
                return string()
            f.seek(unpack("Q"), 1)
            return None
        if kind == _ARRAY:
            inner, count = unpack("I"), unpack("Q")
            if inner in _SCALARS and not keep:
                f.seek(count * struct.calcsize("<" + _SCALARS[inner]), 1)
                return None
            items = [value(inner, keep) for _ in range(count)]
            return items if keep else None
        raise ValueError(f"unknown GGUF value type {kind}")

    if f.read(4) != b"GGUF":
        raise ValueError("not a GGUF file")
    version = unpack("I")
    if version < 2:
        raise ValueError(f"GGUF version {version} is too old")
    unpack("Q")  # tensor count
    found = {}
    for _ in range(unpack("Q")):
        key = string()
        kind = unpack("I")
        result = value(kind, key in wanted)
        if key in wanted:
            found[key] = result
    return found


def complete_tokenizer(tokenizer, metadata: dict[str, Any]) -> list[str]:
    """Fill in the chat template and special tokens the GGUF declares but the tokenizer lacks.

    Returns:
        The names of what was filled in.
    """
    filled = []
    template = metadata.get("tokenizer.chat_template")
    if template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = template
        filled.append("chat_template")
    for role, key in _SPECIAL_IDS.items():
        token_id = metadata.get(key)
        if token_id is None or getattr(tokenizer, role, None) is not None:
            continue
        token = tokenizer.convert_ids_to_tokens(int(token_id))
        if token is not None:
            setattr(tokenizer, role, token)
            filled.append(role)
    return filled


__all__ = ["read_gguf_metadata", "complete_tokenizer"]
