"""What every step of `minisora data download` shares: its error type, records and constants."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from tqdm import tqdm

from minisora.errors import MinisoraError

PARTS_DIR = "parts"  # DIR/parts/<file>: the downloaded archive parts
STATE_FILE = "download.json"  # DIR/download.json: written once the parts are unpacked
CHUNK = 1 << 20  # bytes per read from the network and from the parts

class DownloadError(MinisoraError, RuntimeError):
    """A download, check or unpack that failed; the message names the file or URL and the numbers."""


@dataclass(frozen=True)
class ArchivePart:
    item: str  # Internet Archive item id, e.g. "dmlab_dataset_aa"
    name: str  # the file in that item, e.g. "dmlab.tar.partaa"
    url: str  # where it is downloaded from
    files_xml_url: str  # the item's published file list (sizes and checksums)


@dataclass(frozen=True)
class Published:
    """What the archive publishes about one file; None where it publishes nothing."""

    size: int | None
    md5: str | None
    sha1: str | None


@dataclass
class PartResult:
    name: str
    path: str  # DIR/parts/<name>, or "" when an earlier run unpacked and deleted it
    bytes: int
    fetched: int  # bytes this run added to the part (0: it was already there)
    check: str  # what was verified, and against what


@dataclass
class DownloadReport:
    kind: str
    dir: str
    root: str  # the folder holding train/ and test/
    manifest: str
    parts: list[PartResult]
    members: int  # tar members unpacked by this run (0: an earlier run did)
    clips: int
    skipped: list[tuple[str, str]]  # clips the manifest left out (on_error="skip")



def log_stderr(message: str) -> None:
    tqdm.write(message, file=sys.stderr)
