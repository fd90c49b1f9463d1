"""HTTP for `minisora data download`: http(s)-only redirects, retries, and one part's resumable download.

A part is downloaded to parts/<file>.part, resumed with a Range request where an earlier run (or a
dropped connection) stopped, checked against what the archive publishes (size, md5, sha1), and only
then renamed to parts/<file>; a part that fails its checks is moved to <file>.bad.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from tqdm import tqdm

from minisora.data.download.common import CHUNK, ArchivePart, DownloadError, PartResult, Published, log_stderr

USER_AGENT = "minisora-download/1 (Python urllib)"
_RETRY_HTTP = {408, 429, 500, 502, 503, 504}  # HTTP statuses worth another try
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def check_http_url(url: str, what: str) -> None:
    if urlsplit(url).scheme.lower() not in ("http", "https"):
        raise DownloadError(f"{what} {url!r} is not an http(s) URL")



class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects (the Internet Archive redirects every download to a data node), but only to http(s)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise DownloadError(f"{req.full_url}: redirected to {newurl!r}; only http(s) redirects are followed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)  # keeps the Range header


def make_opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_HttpOnlyRedirects)


def retrying(what: str, attempt: Callable[[], object], retries: int, retry_wait: float, log: Callable[[str], None]):
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


def _open_from(opener, url: str, offset: int, timeout: float):
    """GET `url` from byte `offset` (a Range request when offset > 0)."""
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)


def _total_from_416(error: urllib.error.HTTPError) -> int | None:
    """The file size a 416 Range Not Satisfiable answer announces (Content-Range: bytes */SIZE)."""
    m = re.fullmatch(r"bytes \*/(\d+)", error.headers.get("Content-Range", ""))
    return int(m.group(1)) if m else None


def _resume_point(response, url: str, offset: int, log: Callable[[str], None]) -> tuple[int, int | None]:
    """(the byte this response starts at, the file's total size or None) from its status and headers."""
    if response.status == 206:
        m = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
        if not m or int(m.group(1)) != offset:
            raise DownloadError(f"{url}: asked for bytes {offset}- and got Content-Range "
                                f"{response.headers.get('Content-Range')!r}")
        return offset, None if m.group(3) == "*" else int(m.group(3))
    if response.status == 200:
        if offset:
            log(f"{url}: the server ignored the Range request; downloading it again from byte 0")
        length = response.headers.get("Content-Length")
        return 0, int(length) if length and length.isdigit() else None
    raise DownloadError(f"{url}: unexpected HTTP status {response.status}")


def _append_body(response, url: str, partial: Path, offset: int, limit: int | None, hashes: _Hashes,
                 bar: tqdm) -> int:
    """Write the response body to `partial` from byte `offset` on; return the size `partial` then has."""
    try:
        f = open(partial, "ab" if offset else "wb")
    except OSError as e:
        raise DownloadError(f"{partial}: cannot write ({e.strerror or e})") from None
    size = offset
    with f:
        while chunk := response.read(CHUNK):
            size += len(chunk)
            if limit is not None and size > limit:
                raise DownloadError(f"{url}: sent more than the {limit} bytes the file has")
            try:
                f.write(chunk)
            except OSError as e:
                raise DownloadError(f"{partial}: cannot write ({e.strerror or e}) "
                                    f"after {size - len(chunk)} bytes") from None
            hashes.update(chunk)
            bar.update(len(chunk))
    return size


def _fetch_rest(opener, url: str, partial: Path, hashes: _Hashes, expected: int | None, bar: tqdm,
                timeout: float, log: Callable[[str], None]) -> int | None:
    """Append the bytes of `url` that `partial` lacks, updating `hashes`; return the total size the server announced.

    `hashes` always covers exactly the bytes in `partial`, also when the download starts over.
    """
    offset = partial.stat().st_size if partial.exists() else 0
    if expected is not None and offset == expected:  # complete, stopped before it was verified
        return None
    try:
        response = _open_from(opener, url, offset, timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not offset:
            raise
        total = _total_from_416(e)  # the .part already has every byte (or more than the file has)
        if total == offset:
            return total
        log(f"{url}: the server refuses to resume at byte {offset} (file size {total}); downloading it again")
        partial.unlink()
        hashes.reset()
        bar.reset(total=expected)
        return _fetch_rest(opener, url, partial, hashes, expected, bar, timeout, log)
    with response:
        start, total = _resume_point(response, url, offset, log)
        if start != offset:  # the server sent the whole file: start the hashes and the bar over
            hashes.reset()
            bar.reset(total=expected)
        if expected is not None and total is not None and total != expected:
            raise DownloadError(f"{url}: the server announces {total} bytes "
                                f"but the archive's file list says {expected}")
        size = _append_body(response, url, partial, start, expected if expected is not None else total, hashes, bar)
    if total is not None and size < total:  # http.client ends a cut-short body quietly: make it an error to retry
        raise ConnectionError(f"connection closed after {size} of {total} bytes")
    return total


def _verify(partial: Path, final: Path, hashes: _Hashes, published: Published | None, total: int | None,
            why_none: str) -> str:
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
                                f"nothing was unpacked; the download is kept as {bad} "
                                f"(delete it and run again to download afresh)")
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
                  log: Callable[[str], None] = log_stderr) -> PartResult:
    """Download one part to parts_dir/<name> (resuming parts_dir/<name>.part) and verify it."""
    final, partial = parts_dir / part.name, parts_dir / f"{part.name}.part"
    expected = published.size if published else None
    if final.exists():  # renamed from .part only after it passed its checks
        size = final.stat().st_size
        if expected is not None and size != expected:
            raise DownloadError(f"{final}: {size} bytes but the archive's file list says {expected}; "
                                f"delete it and run again")
        return PartResult(part.name, str(final), size, 0, "verified when it was downloaded")
    hashes = _Hashes(partial)  # a resumed download's checksum covers the bytes already there
    start = partial.stat().st_size if partial.exists() else 0
    if start:
        log(f"{part.name}: resuming at byte {start}" + (f" of {expected}" if expected is not None else ""))
    with tqdm(total=expected, initial=start, desc=part.name, unit="B", unit_scale=True, unit_divisor=1024,
              file=sys.stderr, disable=not progress, leave=False) as bar:
        try:
            total = retrying(part.url,
                             lambda: _fetch_rest(opener, part.url, partial, hashes, expected, bar, timeout, log),
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
