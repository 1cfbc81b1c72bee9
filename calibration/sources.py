"""Calibration sources: turn what the user passed (files, directories, globs) into documents of text.

A source is
  * a ``.txt`` / ``.md`` file: one document,
  * a ``.jsonl`` file: one document per line, taken from the string field ``field`` (``text`` by default),
  * a directory: every ``.txt``, ``.md`` and ``.jsonl`` file below it, in sorted order,
  * a glob (``books/*.txt``, ``data/**/*.jsonl``): the matching files, in sorted order.

Synthetic sources (``synthetic:passkey``) are built elsewhere (:mod:`.passkey`); this module only reads files.
Every problem the user can fix raises :class:`LightTransferError` with one line.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import LightTransferError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
READABLE_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES
SHIPPED_TEXT = Path(__file__).resolve().parent / "data" / "sense_and_sensibility.txt"


@dataclass(frozen=True)
class Document:
    """One document of calibration text and where it came from (``path`` or ``path:line``)."""

    text: str
    origin: str


def expand_source(spec: str, *, option: str = "--calib") -> list[Path]:
    """The files a source names, sorted; raises when it names none (the message names ``option``)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in READABLE_SUFFIXES)
        if not files:
            raise LightTransferError(
                f"{option} '{spec}': the directory holds no .txt, .md or .jsonl file; add text or pass files."
            )
        return files
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise LightTransferError(f"{option} '{spec}': the pattern matches no file; check the path.")
        return files
    raise LightTransferError(f"{option} '{spec}': no such file or directory; pass an existing .txt/.jsonl file.")


def _looks_binary(text: str, *, limit: float = 0.01) -> bool:
    """NUL bytes, or more than ``limit`` of the first 64k characters control characters other than whitespace."""
    head = text[:65536]
    if "\x00" in head:
        return True
    control = sum(1 for ch in head if ord(ch) < 32 and ch not in "\t\n\r\f\v" or 0x7F <= ord(ch) < 0xA0)
    return control > limit * max(len(head), 1)


def read_documents(path: Path, *, field: str = "text", option: str = "--calib") -> list[Document]:
    """Read the documents of one file (see the module docstring), refusing empty or undecodable files; errors
    name ``option`` (``--calib`` for the analysis, ``--data`` for fine-tuning)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LightTransferError(f"{option} '{path}': cannot be read ({exc.strerror or exc}).") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LightTransferError(
            f"{option} '{path}' is not UTF-8 text (bad byte at offset {exc.start}); convert it to UTF-8 first."
        ) from exc
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise LightTransferError(f"{option} '{path}' is empty; pass a file with text in it.")
    if _looks_binary(text):
        raise LightTransferError(
            f"{option} '{path}' looks like a binary file, not text (NUL or control bytes); pass plain text or "
            ".jsonl with a text field."
        )
    if path.suffix.lower() not in JSONL_SUFFIXES:
        return [Document(text=text, origin=str(path))]
    return _jsonl_documents(text, path, field, option)


def _jsonl_documents(text: str, path: Path, field: str, option: str) -> list[Document]:
    docs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LightTransferError(f"{option} '{path}' line {number} is not valid JSON ({exc.msg}).") from exc
        if not isinstance(record, dict) or field not in record:
            raise LightTransferError(
                f"{option} '{path}' line {number} has no field '{field}'; pass --field with the name of the "
                "field that holds the text."
            )
        value = record[field]
        if not isinstance(value, str):
            raise LightTransferError(
                f"{option} '{path}' line {number}: field '{field}' is a {type(value).__name__}, not a string."
            )
        if value.strip():
            docs.append(Document(text=value, origin=f"{path}:{number}"))
    if not docs:
        raise LightTransferError(f"{option} '{path}' has no non-empty '{field}' field in any line.")
    return docs


def collect_documents(specs: list[str], *, field: str = "text", option: str = "--calib") -> list[Document]:
    """All documents of the file sources ``specs``, in the order given (files of a directory sorted); errors
    name the command-line ``option`` the sources came from."""
    docs: list[Document] = []
    for spec in specs:
        for path in expand_source(spec, option=option):
            docs.extend(read_documents(path, field=field, option=option))
    return docs


__all__ = ["Document", "SHIPPED_TEXT", "collect_documents", "expand_source", "read_documents"]
