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
