"""User-facing errors.

Library code raises :class:`LightTransferError` for anything the user can fix (a bad path, an option out of
range, a report that belongs to another model). Its message is one line: what is wrong, which file or option,
and what to do. The CLI prints that line and exits non-zero; a traceback appears only with ``--verbose``.
"""

from __future__ import annotations


class LightTransferError(Exception):
    """A problem with the user's input, reported as one line.

    Args:
        message: what is wrong and what to do, on one line.
        exit_code: the process exit status the CLI uses (1 by default; 2 for usage errors).
    """

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


__all__ = ["LightTransferError"]
