"""Errors the user can fix, told apart from bugs.

``refat`` prints a :class:`RefatError` (bad input, a missing or occupied output, an unreachable endpoint) or a
file-system error (not found, exists, permission, read-only, disk full) as one line, ``refat: error: ...``, and
exits 2; anything else is a bug and keeps its traceback, so a bug's ``ValueError`` is never shown as if the
user's input were wrong. Each specific error also keeps its older base class (``ValueError``,
``FileExistsError``, ...), so code that catches those keeps working.
"""

from __future__ import annotations

import errno

__all__ = ["RefatError", "InputError", "RunError", "user_message"]


class RefatError(Exception):
    """Something the user can fix; the message names the file, field or option."""


class InputError(RefatError, ValueError):
    """An input refat cannot use (a prompt set, a layer, a resource an attack needs), where no more specific
    error class says what; still a ``ValueError`` to callers that catch that."""


class RunError(RefatError, RuntimeError):
    """A run that cannot go on as configured (training diverged, no candidate passed a filter); the message
    says which setting to change. Still a ``RuntimeError``."""


# the file-system errors a user fixes (a path, permissions, space), not a bug's
_FS_ERRNOS = frozenset({errno.ENOENT, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
                        errno.EDQUOT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG})


def user_message(e: BaseException) -> str | None:
    """The one line to print for a user-fixable error; None for anything else (a bug: show its traceback)."""
    if isinstance(e, RefatError):
        return str(e)
    if not isinstance(e, OSError):
        return None
    if e.errno is None:  # raised by refat with a message of its own (FileNotFoundError("no directions at ..."))
        return str(e) if isinstance(e, (FileNotFoundError, FileExistsError, PermissionError)) else None
    if e.errno not in _FS_ERRNOS:
        return None
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    return f"{e.strerror or errno.errorcode.get(e.errno, e.errno)}: {paths}" if paths else str(e)
