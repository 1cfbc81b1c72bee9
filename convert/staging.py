"""All-or-nothing output directories: build in a hidden temp directory beside the target, then rename.

The temp directory lives in the target's parent so that the final ``os.replace`` is a rename on one file
system (atomic). Whatever goes wrong before the rename -- an exception, Ctrl-C, a full disk -- the temp
directory is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import LightTransferError

log = logging.getLogger(__name__)


def check_target(target: Path, *, force: bool) -> None:
    """Refuse a target that exists (unless ``force``) or that ``force`` must not delete.

    ``--force`` only replaces a directory that looks like a model checkpoint (it has a ``config.json``) or is
    empty, so that a mistyped ``--out`` cannot wipe an unrelated folder.
    """
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise LightTransferError(f"--out '{target}' exists and is not a directory; choose another --out path.")
    if not force:
        raise LightTransferError(f"--out '{target}' already exists; pass --force to replace it, or choose another path.")
    if not (target / "config.json").is_file() and any(target.iterdir()):
        raise LightTransferError(
            f"--out '{target}' is a non-empty directory without config.json; --force only replaces model "
            "checkpoints. Remove it yourself or choose another path."
        )


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield an empty temp directory; on normal exit it becomes ``target``, on any error it is deleted.

    Args:
        target: the directory to create.
        force: replace an existing checkpoint directory at ``target`` (old one renamed aside, new one moved
            in, old one deleted).

    Raises:
        LightTransferError: the target exists without ``force``; the disk filled up (``ENOSPC``/``EDQUOT``).
    """
    target = Path(target).expanduser().absolute()
    check_target(target, force=force)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        _normalize_permissions(tmp)
        check_target(target, force=force)  # something may have appeared there meanwhile
        _move_into_place(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise LightTransferError(
                f"the disk holding '{target.parent}' is full; nothing was written. Free some space or choose "
                "another --out."
            ) from exc
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise LightTransferError(
            f"could not write the checkpoint '{target}' ({reason}: {exc.filename or target.parent}); nothing was "
            "written. Check the permissions and free space there, or choose another --out."
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_STALE = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?:(?P<pid>\d+)-)?[^/]*$")


def clean_stale(target: Path) -> list[Path]:
    """Remove the temp directories an earlier, killed run left beside ``target`` (``.{name}.tmp-{pid}-*``
    whose process is gone); report, and keep, those of a run still alive or written before the name carried
    its pid. Returns the ones removed."""
    removed = []
    for path in sorted(target.parent.glob(f".{glob.escape(target.name)}.tmp-*")) + \
            sorted(target.parent.glob(f".{glob.escape(target.name)}.old-*")):
        match = _STALE.match(path.name)
        if not path.is_dir() or match is None or match["name"] != target.name:
            continue
        pid = int(match["pid"]) if match["pid"] else None
        if pid is not None and pid != os.getpid() and not _alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            log.warning("removed %s, left behind by an interrupted convert (process %d)", path, pid)
        elif pid is None:
            log.warning("%s was left behind by an interrupted convert; remove it to free its space "
                        "(rm -r '%s')", path, path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _normalize_permissions(root: Path) -> None:
    """Give what we created the usual umask permissions (mkdtemp and mkstemp make them private).

    Hard-linked files are left alone: their mode is the source file's own.
    """
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        st = path.lstat()
        if path.is_symlink() or (path.is_file() and st.st_nlink > 1):
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _move_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
    os.rmdir(old)
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)  # put the previous checkpoint back
        raise
    shutil.rmtree(old, ignore_errors=True)
    log.info("replaced the previous contents of %s", target)


__all__ = ["staged_directory", "check_target", "clean_stale"]
