"""Writing results safely: check an output path before the work, write through a temporary file beside it.

Every command that writes a file checks ``--out`` first (:func:`check_output_file`, :func:`check_output_dir`), so
that a read-only folder or a typo costs nothing, and writes with :func:`atomic_path` or :func:`publish_together`,
so that a reader never sees half a file and an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import LightTransferError


def _nearest_existing(path: Path) -> Path:
    parent = path
    while not parent.exists():
        parent = parent.parent
    return parent


def _check_creatable(folder: Path, option: str, path: str | os.PathLike[str]) -> None:
    existing = _nearest_existing(folder)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise LightTransferError(f"{option} '{path}': cannot write into '{existing}'; pick another place.")


def check_output_file(path: str | os.PathLike[str] | None, option: str, suffix: str | None = None) -> Path | None:
    """``path`` as a :class:`Path` once it is known to be writable (its folder may not exist yet).

    Args:
        path: the file the command will write, or ``None`` (nothing to check).
        option: the option's name for the message (``--out``).
        suffix: the ending it must have (``.json``), case-insensitive, or ``None``.
    Raises:
        LightTransferError: wrong ending, a directory in its place, or a folder that cannot be written.
    """
    if path is None:
        return None
    target = Path(path)
    if suffix is not None and target.suffix.lower() != suffix:
        raise LightTransferError(f"{option} '{path}' must end with {suffix}.")
    if target.is_dir():
        raise LightTransferError(f"{option} '{path}' is a directory; pass a file name"
                                 + (f" ending with {suffix}." if suffix else "."))
    if target.exists() and not os.access(target, os.W_OK):
        raise LightTransferError(f"{option} '{path}' exists and is read-only; pick another place.")
    _check_creatable(target.parent, option, path)
    return target


def check_output_dir(path: str | os.PathLike[str], option: str) -> Path:
    """``path`` as a :class:`Path` once a folder can be created (or written) there.

    Raises:
        LightTransferError: a file in its place, or a parent that cannot be written.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise LightTransferError(f"{option} '{path}' is a file; pass a directory.")
    _check_creatable(target, option, path)
    return target


def check_output_target(path: str | os.PathLike[str] | None, option: str = "--out") -> Path | None:
    """``--out`` of a command that writes ``<stem>.json`` and files beside it, or into a directory: checked
    before the work, as a file when it ends with ``.json``, else as a directory."""
    if path is None:
        return None
    if Path(path).suffix.lower() == ".json":
        return check_output_file(path, option, ".json")
    return check_output_dir(path, option)


def write_error(path: str | os.PathLike[str], exc: OSError) -> LightTransferError:
    """A one-line error for a write that failed (a full disk, a folder that became read-only)."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return LightTransferError(f"could not write '{path}' ({reason}); nothing was left half-written. Free some "
                              "space or pick another place.")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path``: renamed onto ``path`` when the block succeeds, removed when it fails.

    The folder is created if needed; the rename is atomic (same file system), so readers see the old file or the
    whole new one."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) from exc
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(path, exc) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomically(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def write_json(path: str | os.PathLike[str], payload: Any, *, indent: int = 2) -> Path:
    """``payload`` as JSON with sorted keys and a final newline, written atomically."""
    return write_atomically(path, json.dumps(payload, indent=indent, sort_keys=True) + "\n")


def publish_together(writers: Mapping[Path, Callable[[Path], bool | None]]) -> list[Path]:
    """Write several files that appear together or not at all.

    Args:
        writers: ``{final path: writer}``; each writer writes its file to the temporary path it is given and
            may return ``False`` to skip it (a plot with nothing to draw). All final paths share one folder.
    Returns:
        The paths written, in the order given.
    """
    paths = list(writers)
    if not paths:
        return []
    parent = paths[0].parent
    if any(p.parent != parent for p in paths):
        raise ValueError("publish_together writes into one folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".publish-", dir=parent))
    except OSError as exc:
        raise write_error(paths[0], exc) from exc
    current = paths[0]
    try:
        staged = []
        for i, (path, write) in enumerate(writers.items()):
            current = path
            part = tmp / f"{i}{path.suffix}"
            if write(part) is not False:
                staged.append((part, path))
        for part, path in staged:
            current = path
            os.replace(part, path)
        return [path for _, path in staged]
    except OSError as exc:
        raise write_error(current, exc) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["check_output_file", "check_output_dir", "check_output_target", "write_error", "atomic_path", "write_atomically", "write_json",
           "publish_together"]
