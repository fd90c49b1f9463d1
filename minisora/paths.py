"""What a path option names: one rule for every --out, --checkpoint, --store, --context and --vae.

A value with a scheme (`s3://...`, `memory://...`, `file://...`) is a URL; anything else is a
local path. A URL is accepted only by the options that read or write through fsspec (a latent
store: `--store`, `encode --out`, the STORE of a `--context STORE:SPLIT:INDEX`), and only for a
protocol fsspec knows; every other option takes local paths (`--vae`: a local directory or a Hub
id), so `train --out s3://bucket/run` is refused instead of writing a local folder named `s3:`.
The CLI checks each option with these functions before it calls its stage, so no work starts
before the check; outputs are also checked for being writable (minisora.errors.unwritable_reason).
"""

from __future__ import annotations

import os
import re

# OutputPathError: re-exported for the CLI's own output checks
from minisora.errors import OutputPathError, check_writable, unwritable_reason  # noqa: F401

URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
STORE_URLS = "a local path or an fsspec URL (s3://, gs://, memory://, file://, ...)"


class PathOptionError(OutputPathError):
    """A path option whose value this option cannot mean (a URL where a local path goes, an unknown protocol)."""


def url_protocol(value) -> str | None:
    """'s3' for 's3://bucket/x', None for a local path."""
    m = URL.match(str(value))
    return m.group(1).lower() if m else None


def check_location(value, option: str, urls: bool = False, accepts: str = "a local path") -> None:
    """Refuse a URL where `option` takes local paths only (`urls=False`), and a URL of a protocol that fsspec
    does not know where it takes URLs. `accepts` says, in the message, what the option takes."""
    if value is None or (protocol := url_protocol(value)) is None:
        return
    if not urls:
        raise PathOptionError(f"{option} {value}: is a URL; {option} takes {accepts}")
    import fsspec

    try:
        fsspec.get_filesystem_class(protocol)
    except (ValueError, ImportError) as e:
        reason = "unknown protocol" if isinstance(e, ValueError) else f"its package is not installed ({e})"
        raise PathOptionError(f"{option} {value}: {protocol}:// is not usable: {reason}; {option} takes "
                              f"{STORE_URLS}") from None


def check_store(value, option: str = "--store") -> None:
    """A latent store to read or write: a local path or an fsspec URL."""
    check_location(value, option, urls=True, accepts=STORE_URLS)


def check_context(value, option: str = "--context") -> None:
    """A clip file (local) or STORE:SPLIT:INDEX, whose STORE may be an fsspec URL."""
    if value is None:
        return
    parts = str(value).rsplit(":", 2)
    if len(parts) == 3 and parts[2].isdigit():
        check_store(parts[0], option)
    else:
        check_location(value, option, accepts="a local clip file (.npz / .mp4) or STORE:SPLIT:INDEX")


def check_vae(value, option: str = "--vae") -> None:
    check_location(value, option, accepts="a local diffusers model directory or a Hub id (owner/name)")


def check_output_file(value, option: str = "--out") -> None:
    """A local file to write (or a stem: OUT.mp4, ...): not a URL, not a directory, its folder writable."""
    check_location(value, option)
    check_writable(value, option, file=True)


def check_output_stem(value, option: str = "--out") -> None:
    """A local stem (OUT -> OUT.mp4, OUT-00.gif, ...): not a URL, its folder writable."""
    check_location(value, option)
    check_writable(value, option, file=False)


def check_output_dir(value, option: str = "--out") -> None:
    """A local directory to write into: not a URL, not an existing file, creatable and writable."""
    check_location(value, option)
    full = os.path.abspath(os.path.expanduser(str(value)))
    if os.path.exists(full) and not os.path.isdir(full):
        raise OutputPathError(f"{option} {value}: is an existing file; {option} must be a new or existing "
                              "directory")
    if (reason := unwritable_reason(full)) is not None:
        raise OutputPathError(f"{option} {value}: {reason}; choose another path")


def check_store_output(value, option: str = "--out") -> None:
    """A latent store to write: an fsspec URL, or a local directory (checked as check_output_dir)."""
    check_store(value, option)
    if url_protocol(value) is None:
        check_output_dir(value, option)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's endpoint answers a TCP connection within `timeout` s (False with HF_HUB_OFFLINE set):
    without it, a name missing from the local cache fails at once instead of after the Hub client's retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False
