"""`minisora data download`: fetch TECO's archives from the Internet Archive, verify, unpack, manifest.

The dataset card (data_manifests/<kind>.json, key `download`) names the Internet Archive items and
the one file in each: the parts of one split tar archive. `download_dataset(kind, DIR)` does, in
the card's order:

  1. checksums: GET <base>/<item>/<item>_files.xml, the archive's per-item file list with size,
     md5 and sha1. Where it is not published or not reachable, the size announced by the
     server (Content-Length) is the only check, and the report says that no checksum was available.
  2. download: to DIR/parts/<file>.part, resuming with an HTTP Range request where an earlier run
     stopped (and after a dropped connection, up to `retries` times). A part that passes its
     checks is renamed to DIR/parts/<file>; one that fails is moved to <file>.bad and the run
     stops before anything is unpacked.
  3. unpack: the parts, concatenated in order, are one tar stream (`cat part* | tar x`) that
     tarfile reads in stream mode; every member goes through tarfile's `data` filter first, so
     absolute paths, `..`, links that leave DIR and device files are refused, never written.
  4. manifest: build_manifest() on the folder that holds train/ and test/ (DIR or the one folder
     the archive unpacks to), saved to DIR/manifest.json.

A finished unpack is recorded in DIR/download.json, so running the command again skips 1-3.
HTTP is the standard library's urllib; only http(s) URLs are fetched, and a redirect to any other
scheme is refused.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import re
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import quote, urlsplit

from tqdm import tqdm

from minisora.data import CARDS_DIR, load_dataset_card
from minisora.data.manifest import SPLITS, build_manifest
from minisora.errors import MinisoraError

PARTS_DIR = "parts"  # DIR/parts/<file>: the downloaded archive parts
STATE_FILE = "download.json"  # DIR/download.json: written once the parts are unpacked
CHUNK = 1 << 20  # bytes per read from the network and from the parts
USER_AGENT = "minisora-download/1 (Python urllib)"
FILES_XML_MAX = 16 << 20  # an item's file list is a few kB; refuse anything this large
_RETRY_HTTP = {408, 429, 500, 502, 503, 504}  # HTTP statuses worth another try
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_HEX = {"md5": re.compile(r"[0-9a-f]{32}"), "sha1": re.compile(r"[0-9a-f]{40}")}


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


def _log_stderr(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


# --- where the parts are ------------------------------------------------------------------------


def _check_http_url(url: str, what: str) -> None:
    if urlsplit(url).scheme.lower() not in ("http", "https"):
        raise DownloadError(f"{what} {url!r} is not an http(s) URL")


def archive_parts(kind: str, base_url: str | None = None) -> list[ArchivePart]:
    """The parts of `kind`'s archive, as the dataset card lists them, in unpacking order.

    The card's file URLs have the form <base>/<item>/<file>; `base_url` replaces <base>
    (a mirror with the same <item>/<file> layout).
    """
    download = load_dataset_card(kind)["download"]
    card = CARDS_DIR / f"{kind}.json"
    items, files = download["items"], download["files"]
    if len(items) != len(files):
        raise DownloadError(f"{card}: download.items has {len(items)} entries but download.files has {len(files)}")
    if base_url is not None:
        _check_http_url(base_url, "--base-url")
    parts = []
    for item, url in zip(items, files):
        card_base, item_in_url, name = url.rsplit("/", 2)
        if item_in_url != item or not name:
            raise DownloadError(f"{card}: file URL {url!r} is not <base>/{item}/<file>")
        base = card_base if base_url is None else base_url.rstrip("/")
        _check_http_url(base, f"{card}: download base of")
        item_url = f"{base}/{quote(item)}"
        parts.append(ArchivePart(item, name, f"{item_url}/{quote(name)}", f"{item_url}/{quote(item)}_files.xml"))
    return parts


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects (the Internet Archive redirects every download to a data node), but only to http(s)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise DownloadError(f"{req.full_url}: redirected to {newurl!r}; only http(s) redirects are followed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)  # keeps the Range header


def make_opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_HttpOnlyRedirects)


def _retrying(what: str, attempt: Callable[[], object], retries: int, retry_wait: float, log: Callable[[str], None]):
    """attempt(), again after network errors and 408/429/5xx answers, waiting 1, 2, 4 ... x retry_wait s."""
    for tries in range(retries + 1):
        try:
            return attempt()
        except urllib.error.HTTPError as e:
            if e.code not in _RETRY_HTTP or tries == retries:
                raise
            error = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, reset, timeout, cut short
            if tries == retries:
                raise
            error = str(getattr(e, "reason", None) or e) or type(e).__name__
        wait = min(60.0, retry_wait * 2**tries)
        log(f"{what}: {error}; retry {tries + 1}/{retries} in {wait:.0f}s")
        time.sleep(wait)


# --- what the archive publishes -----------------------------------------------------------------


def parse_files_xml(data: bytes, name: str, source: str) -> Published | None:
    """The size/md5/sha1 of file `name` in an Internet Archive <item>_files.xml; None if it is not listed.

        <files><file name="dmlab.tar.partaa" source="original"><size>123</size><md5>...</md5>
               <sha1>...</sha1>...</file>...</files>
    """
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise DownloadError(f"{source}: not an Internet Archive file list ({e})") from None
    if root.tag != "files":
        raise DownloadError(f"{source}: not an Internet Archive file list (root element <{root.tag}>, expected <files>)")
    for entry in root.findall("file"):
        if entry.get("name") != name:
            continue
        size = (entry.findtext("size") or "").strip()
        if size and not size.isdigit():
            raise DownloadError(f"{source}: {name} has size {size!r}, not a number of bytes")
        digests = {}
        for algo, pattern in _HEX.items():
            value = (entry.findtext(algo) or "").strip().lower()
            if value and not pattern.fullmatch(value):
                raise DownloadError(f"{source}: {name} has {algo} {value!r}, not a {algo} hex digest")
            digests[algo] = value or None
        return Published(int(size) if size else None, **digests)
    return None


def fetch_published(part: ArchivePart, opener, *, timeout: float = 60.0, retries: int = 3, retry_wait: float = 1.0,
                    log: Callable[[str], None] = _log_stderr) -> tuple[Published | None, str]:
    """(what <item>_files.xml says about the part, "") or (None, why there is nothing to check against)."""
    url = part.files_xml_url

    def get() -> bytes:
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        with opener.open(request, timeout=timeout) as response:
            return response.read(FILES_XML_MAX + 1)

    try:
        data = _retrying(url, get, retries, retry_wait, log)
    except urllib.error.HTTPError as e:
        return None, f"{url}: HTTP {e.code} {e.reason}"
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        return None, f"{url}: not reachable ({getattr(e, 'reason', None) or e})"
    if len(data) > FILES_XML_MAX:
        raise DownloadError(f"{url}: more than {FILES_XML_MAX} bytes; not an item's file list")
    published = parse_files_xml(data, part.name, url)
    if published is None:
        return None, f"{url} does not list {part.name}"
    return published, ""


# --- one part -----------------------------------------------------------------------------------


class _Hashes:
    """md5 and sha1 of the bytes written so far to a .part file."""

    def __init__(self, path: Path | None = None):
        self.reset()
        if path is not None and path.exists():
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    self.update(chunk)

    def reset(self) -> None:
        self.md5, self.sha1 = hashlib.md5(), hashlib.sha1()

    def update(self, chunk: bytes) -> None:
        self.md5.update(chunk)
        self.sha1.update(chunk)


def _fetch_rest(opener, url: str, partial: Path, hashes: _Hashes, expected: int | None, bar: tqdm,
                timeout: float, log: Callable[[str], None]) -> int | None:
    """Append the bytes of `url` that `partial` lacks, updating `hashes`; return the total size the server announced.

    `hashes` always covers exactly the bytes in `partial`, also when the download starts over.
    """
    offset = partial.stat().st_size if partial.exists() else 0
    if expected is not None and offset == expected:  # complete, stopped before it was verified
        return None
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not offset:
            raise
        # Range Not Satisfiable: the .part already has every byte (or more than the file has)
        m = re.fullmatch(r"bytes \*/(\d+)", e.headers.get("Content-Range", ""))
        total = int(m.group(1)) if m else None
        if total == offset:
            return total
        log(f"{url}: the server refuses to resume at byte {offset} (file size {total}); downloading it again")
        partial.unlink()
        hashes.reset()
        bar.reset(total=expected)
        return _fetch_rest(opener, url, partial, hashes, expected, bar, timeout, log)
    with response:
        if response.status == 206:
            m = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:
                raise DownloadError(f"{url}: asked for bytes {offset}- and got Content-Range {response.headers.get('Content-Range')!r}")
            total = None if m.group(3) == "*" else int(m.group(3))
            mode = "ab"
        elif response.status == 200:
            if offset:
                log(f"{url}: the server ignored the Range request; downloading it again from byte 0")
                offset = 0
                hashes.reset()
                bar.reset(total=expected)
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            mode = "wb"
        else:
            raise DownloadError(f"{url}: unexpected HTTP status {response.status}")
        if expected is not None and total is not None and total != expected:
            raise DownloadError(f"{url}: the server announces {total} bytes but the archive's file list says {expected}")
        limit = expected if expected is not None else total
        size = offset
        try:
            f = open(partial, mode)
        except OSError as e:
            raise DownloadError(f"{partial}: cannot write ({e.strerror or e})") from None
        with f:
            while chunk := response.read(CHUNK):
                size += len(chunk)
                if limit is not None and size > limit:
                    raise DownloadError(f"{url}: sent more than the {limit} bytes the file has")
                try:
                    f.write(chunk)
                except OSError as e:
                    raise DownloadError(f"{partial}: cannot write ({e.strerror or e}) after {size - len(chunk)} bytes") from None
                hashes.update(chunk)
                bar.update(len(chunk))
        if total is not None and size < total:  # http.client ends a cut-short body quietly: make it an error to retry
            raise ConnectionError(f"connection closed after {size} of {total} bytes")
        return total


def _verify(partial: Path, final: Path, hashes: _Hashes, published: Published | None, total: int | None, why_none: str) -> str:
    """Compare the downloaded bytes with what is published; rename to `final`, or move to .bad and raise."""
    size = partial.stat().st_size
    expected = published.size if published and published.size is not None else total
    checks: list[tuple[str, object, object]] = [("size", size, expected)] if expected is not None else []
    if published is not None:
        checks += [(algo, getattr(hashes, algo).hexdigest(), getattr(published, algo))
                   for algo in ("md5", "sha1") if getattr(published, algo)]
    for what, got, want in checks:
        if got != want:
            bad = final.with_name(final.name + ".bad")
            os.replace(partial, bad)
            from_list = what != "size" or (published is not None and published.size is not None)
            source = "the archive's file list" if from_list else "Content-Length"
            raise DownloadError(f"{final}: {what} is {got} but {source} says {want}; "
                                f"nothing was unpacked; the download is kept as {bad} (delete it and run again to download afresh)")
    os.replace(partial, final)
    if published is not None and (published.md5 or published.sha1):
        return f"{', '.join(what for what, _, _ in checks)} match the archive's file list"
    reason = why_none or "the archive's file list gives no md5/sha1"
    if not checks:
        return f"not verified: no size or checksum available ({reason})"
    source = "the archive's file list" if published is not None and published.size is not None else "Content-Length"
    return f"size {size} matches {source}; no checksum available ({reason})"


def download_part(part: ArchivePart, parts_dir: Path, opener, *, published: Published | None, why_none: str = "",
                  timeout: float = 60.0, retries: int = 5, retry_wait: float = 1.0, progress: bool = True,
                  log: Callable[[str], None] = _log_stderr) -> PartResult:
    """Download one part to parts_dir/<name> (resuming parts_dir/<name>.part) and verify it."""
    final, partial = parts_dir / part.name, parts_dir / f"{part.name}.part"
    expected = published.size if published else None
    if final.exists():  # renamed from .part only after it passed its checks
        size = final.stat().st_size
        if expected is not None and size != expected:
            raise DownloadError(f"{final}: {size} bytes but the archive's file list says {expected}; delete it and run again")
        return PartResult(part.name, str(final), size, 0, "verified when it was downloaded")
    hashes = _Hashes(partial)  # a resumed download's checksum covers the bytes already there
    start = partial.stat().st_size if partial.exists() else 0
    if start:
        log(f"{part.name}: resuming at byte {start}" + (f" of {expected}" if expected is not None else ""))
    with tqdm(total=expected, initial=start, desc=part.name, unit="B", unit_scale=True, unit_divisor=1024,
              file=sys.stderr, disable=not progress, leave=False) as bar:
        try:
            total = _retrying(part.url, lambda: _fetch_rest(opener, part.url, partial, hashes, expected, bar, timeout, log),
                              retries, retry_wait, log)
        except urllib.error.HTTPError as e:
            raise DownloadError(f"{part.url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            have = partial.stat().st_size if partial.exists() else 0
            raise DownloadError(f"{part.url}: failed after {retries} retries ({getattr(e, 'reason', None) or e}); "
                                f"{partial} keeps {have} bytes, run again to resume") from None
    size = partial.stat().st_size
    check = _verify(partial, final, hashes, published, total, why_none)
    return PartResult(part.name, str(final), size, size - start, check)


# --- unpacking ----------------------------------------------------------------------------------


class _Concatenated(io.RawIOBase):
    """Files read one after another as one stream: `cat a b c`."""

    def __init__(self, paths: list[Path], bar: tqdm):
        self.paths, self.bar = list(paths), bar
        self.index, self.file, self.consumed = 0, None, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.index < len(self.paths):
            if self.file is None:
                self.file = open(self.paths[self.index], "rb")
            n = self.file.readinto(buffer)
            if n:
                self.consumed += n
                self.bar.update(n)
                return n
            self.file.close()
            self.file, self.index = None, self.index + 1
        return 0

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        super().close()


def unpack_parts(paths: list[Path], dest: Path, *, progress: bool = True) -> int:
    """Extract the tar archive split into `paths` (in order) under `dest`; return the number of members.

    Every member passes tarfile's `data` filter before it is written: a member that would land
    outside `dest` (absolute path, `..`, a link pointing out) or is a device file stops the unpack
    with a DownloadError naming it.
    """
    dest = Path(dest).resolve()
    names = f"{paths[0].name} .. {paths[-1].name}" if len(paths) > 1 else paths[0].name
    total = sum(p.stat().st_size for p in paths)
    members = 0
    with tqdm(total=total, desc=f"unpacking {names}", unit="B", unit_scale=True, unit_divisor=1024,
              file=sys.stderr, disable=not progress, leave=False) as bar:
        concatenated = _Concatenated(paths, bar)
        stream = io.BufferedReader(concatenated, CHUNK)
        try:
            with stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    try:
                        tar.extract(member, dest, filter="data")
                    except tarfile.FilterError as e:
                        raise DownloadError(f"{names}: refused tar member {member.name!r} ({e}); "
                                            f"the unpack stopped there, {members} earlier member(s) are in {dest}") from None
                    members += 1
        except (tarfile.ReadError, EOFError) as e:
            raise DownloadError(f"{names}: not a complete tar archive: {e} after {concatenated.consumed} of {total} bytes") from None
    return members


def find_clip_root(directory: Path, skip: tuple[str, ...] = (PARTS_DIR,), depth: int = 3) -> Path:
    """`directory` if it holds train/ or test/, else the one folder below it (shallowest first) that does."""
    level = [Path(directory)]
    for _ in range(depth + 1):
        found = [d for d in level if any((d / s).is_dir() for s in SPLITS)]
        if len(found) == 1:
            return found[0]
        if found:
            raise DownloadError(f"{directory}: several folders hold train/ or test/: {', '.join(map(str, found))}; "
                                f"run `minisora data manifest` on the one you want")
        level = sorted(c for d in level for c in d.iterdir() if c.is_dir() and c.name not in skip and c.name not in SPLITS)
    raise DownloadError(f"{directory}: the unpacked archive has no train/ or test/ folder within {depth} levels")


# --- the whole command --------------------------------------------------------------------------


def _read_state(path: Path, kind: str, parts: list[ArchivePart]) -> dict | None:
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DownloadError(f"{path}: unreadable download record ({e}); delete it to unpack the parts again") from None
    if state.get("kind") != kind:
        raise DownloadError(f"{path}: this directory holds the {state.get('kind')!r} dataset, not {kind!r}; choose another DIR")
    if [p["name"] for p in state.get("parts", [])] != [p.name for p in parts]:
        return None  # the card changed: download and unpack again
    return state


def _warn_disk_space(part: ArchivePart, published: Published | None, parts_dir: Path, log: Callable[[str], None]) -> None:
    """Say so when a part that is still to be downloaded cannot fit (the unpacked data needs as much again)."""
    if published is None or published.size is None or (parts_dir / part.name).exists():
        return
    partial = parts_dir / f"{part.name}.part"
    need = published.size - (partial.stat().st_size if partial.exists() else 0)
    free = shutil.disk_usage(parts_dir).free
    if need > free:
        log(f"warning: {part.name} needs {need} more bytes but {parts_dir} has {free} free")


def _download_and_unpack(kind: str, parts: list[ArchivePart], directory: Path, *, keep_parts: bool, timeout: float,
                         retries: int, retry_wait: float, progress: bool, log: Callable[[str], None]) -> tuple[list[PartResult], dict]:
    """Steps 1-3 of the module docstring; returns the parts and the download record written to DIR/download.json."""
    parts_dir = directory / PARTS_DIR
    parts_dir.mkdir(parents=True, exist_ok=True)
    opener = make_opener()
    results = []
    for part in parts:
        published, why_none = fetch_published(part, opener, timeout=timeout, retries=min(retries, 3), retry_wait=retry_wait, log=log)
        if published is None:
            log(f"{part.name}: no checksum available ({why_none}); checking the size against Content-Length only")
        _warn_disk_space(part, published, parts_dir, log)
        results.append(download_part(part, parts_dir, opener, published=published, why_none=why_none, timeout=timeout,
                                     retries=retries, retry_wait=retry_wait, progress=progress, log=log))
        log(f"{part.name}: {results[-1].bytes} bytes; {results[-1].check}")
    members = unpack_parts([Path(r.path) for r in results], directory, progress=progress)
    root = find_clip_root(directory)
    state = {"kind": kind, "root": os.path.relpath(root, directory), "members": members, "parts": [asdict(r) for r in results]}
    tmp = directory / f".{STATE_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, directory / STATE_FILE)
    if not keep_parts:
        for r in results:
            Path(r.path).unlink(missing_ok=True)
            r.path = ""
        if not any(parts_dir.iterdir()):
            parts_dir.rmdir()
    return results, state


def download_dataset(kind: str, directory, *, base_url: str | None = None, manifest=None, keep_parts: bool = True,
                     on_error: str = "fail", workers: int = 1, timeout: float = 60.0, retries: int = 5,
                     retry_wait: float = 1.0, progress: bool = True, log: Callable[[str], None] = _log_stderr) -> DownloadReport:
    """Download, verify and unpack `kind`'s archive into `directory`, then write its clip manifest.

    `base_url` replaces https://archive.org/download (a mirror); the manifest goes to `manifest`
    [default: DIR/manifest.json]; `on_error` and `workers` are build_manifest's.
    """
    directory = Path(directory).absolute()
    manifest_path = Path(manifest) if manifest is not None else directory / "manifest.json"
    parts = archive_parts(kind, base_url)
    state = _read_state(directory / STATE_FILE, kind, parts)
    if state is None:
        results, state = _download_and_unpack(kind, parts, directory, keep_parts=keep_parts, timeout=timeout, retries=retries,
                                              retry_wait=retry_wait, progress=progress, log=log)
        members = state["members"]
    else:
        log(f"{directory / STATE_FILE}: the archive was downloaded and unpacked before; building the manifest")
        results = [PartResult(p["name"], p["path"] if p["path"] and Path(p["path"]).exists() else "", p["bytes"], 0, p["check"])
                   for p in state["parts"]]
        members = 0
    root = (directory / state["root"]).resolve()
    m, skipped = build_manifest(root, kind, on_error=on_error, workers=workers)
    m.save(manifest_path)
    return DownloadReport(kind, str(directory), str(root), str(manifest_path), results, members, len(m.clips), skipped)
