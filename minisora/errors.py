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


def user_message(e: BaseException, where: str | None = None) -> str:
    """One line for an error the CLI reports: minisora errors as they are, OS errors as 'path: problem'.

    `where`: the path or URL the command was working on (the CLI passes its --out, or the URL it was given),
    named for errors that carry no file of their own: a full disk (ENOSPC), S3 credentials or connection."""
    if isinstance(e, OSError) and not isinstance(e, MinisoraError) and e.filename is not None:
        target = f" -> {e.filename2}" if e.filename2 else ""
        return f"{e.filename}{target}: {e.strerror or e}"
    if (remote := _s3_message(e)) is not None:
        return f"{where or 'S3'}: {remote}"
    text = " ".join((str(e) or type(e).__name__).split())
    if isinstance(e, OSError) and not isinstance(e, MinisoraError) and where:
        return f"{where}: {text}"
    return text


def is_remote_error(e: BaseException) -> bool:
    """An error of the S3 client (botocore), reported as one line like an OSError."""
    return type(e).__module__.split(".")[0] in ("botocore", "aiobotocore")


def _s3_message(e: BaseException) -> str | None:
    """What went wrong talking to S3, and what to do, for botocore's errors; None for any other error."""
    if not is_remote_error(e):
        return None
    name, text = type(e).__name__, " ".join(str(e).split())
    if "Credentials" in name:
        return (f"no usable S3 credentials ({text}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                f"AWS_PROFILE")
    if "Connect" in name or "Timeout" in name:
        return f"cannot reach the S3 endpoint ({text}); check AWS_ENDPOINT_URL and the network"
    return f"S3 refused the request ({text}); check the credentials and the bucket"


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
