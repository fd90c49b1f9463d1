"""The one base class of the errors minisora reports to a user.

Every module raises its own error type (StoreError, ClipError, VAEError, EncodeError, ...), each a
subclass of `MinisoraError` and of the builtin it has always been (ValueError, RuntimeError), so
callers that caught the builtin keep working. str(e) is one line that names the path or value and
the problem, and says what to do where there is something to do. The CLI formats them in one
place (cli/main.py); tracebacks only with `minisora --debug` or MINISORA_DEBUG=1.
"""

from __future__ import annotations

import os


class MinisoraError(Exception):
    """An error with a message meant for the user (one line, naming the file or value)."""


class MinisoraWarning(UserWarning):
    """Something the user should know that does not stop the command (the CLI prints it as one line)."""


def debug_enabled() -> bool:
    """True when the user asked for tracebacks (`minisora --debug` sets MINISORA_DEBUG=1)."""
    return os.environ.get("MINISORA_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def user_message(e: BaseException) -> str:
    """One line for an error the CLI reports: minisora errors as they are, OS errors as 'path: problem'."""
    if isinstance(e, OSError) and not isinstance(e, MinisoraError) and e.filename is not None:
        target = f" -> {e.filename2}" if e.filename2 else ""
        return f"{e.filename}{target}: {e.strerror or e}"
    text = str(e) or type(e).__name__
    return " ".join(text.split("\n")) if "\n" in text.strip() else text.strip()


class OutputPathError(MinisoraError, ValueError):
    """An output path that cannot be written (under a file, a directory where a file goes, read-only)."""


def unwritable_reason(start: str) -> str | None:
    """Why nothing can be created at or below the local path `start`, judged by its nearest existing ancestor
    ("cannot be created, X is a file" / "cannot write there (X is not writable)"), or None when it can."""
    parent = start
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"cannot be created, {parent} is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot write there ({parent} is not writable)"
    return None


def check_writable(path, option: str = "--out", file: bool = True) -> None:
    """Refuse, before any work is done, an output path that cannot be written.

    `file=True`: PATH itself must not be a directory. The nearest existing ancestor must be a
    directory this process can write into."""
    full = os.path.abspath(os.path.expanduser(str(path)))
    if file and os.path.isdir(full):
        raise OutputPathError(f"{option} {path}: is a directory; give a file path")
    if (reason := unwritable_reason(os.path.dirname(full))) is not None:
        raise OutputPathError(f"{option} {path}: {reason}; choose another path")
