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

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from minisora.data.download.archive import archive_parts, fetch_published, parse_files_xml
from minisora.data.download.common import (PARTS_DIR, STATE_FILE, ArchivePart, DownloadError, DownloadReport,
                                           PartResult, Published, log_stderr)
from minisora.data.download.http import download_part, make_opener
from minisora.data.download.unpack import find_clip_root, unpack_parts
from minisora.data.manifest import build_manifest

__all__ = ["PARTS_DIR", "STATE_FILE", "ArchivePart", "DownloadError", "DownloadReport", "PartResult", "Published",
           "archive_parts", "download_dataset", "download_part", "fetch_published", "find_clip_root", "make_opener",
           "parse_files_xml", "unpack_parts"]


def _read_state(path: Path, kind: str, parts: list[ArchivePart]) -> dict | None:
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DownloadError(f"{path}: unreadable download record ({e}); delete it to unpack the parts again") from None
    if state.get("kind") != kind:
        raise DownloadError(f"{path}: this directory holds the {state.get('kind')!r} dataset, not {kind!r}; "
                            f"choose another DIR")
    if [p["name"] for p in state.get("parts", [])] != [p.name for p in parts]:
        return None  # the card changed: download and unpack again
    return state


def _warn_disk_space(part: ArchivePart, published: Published | None, parts_dir: Path,
                     log: Callable[[str], None]) -> None:
    """Say so when a part that is still to be downloaded cannot fit (the unpacked data needs as much again)."""
    if published is None or published.size is None or (parts_dir / part.name).exists():
        return
    partial = parts_dir / f"{part.name}.part"
    need = published.size - (partial.stat().st_size if partial.exists() else 0)
    free = shutil.disk_usage(parts_dir).free
    if need > free:
        log(f"warning: {part.name} needs {need} more bytes but {parts_dir} has {free} free")


def _download_and_unpack(kind: str, parts: list[ArchivePart], directory: Path, *, keep_parts: bool, timeout: float,
                         retries: int, retry_wait: float, progress: bool,
                         log: Callable[[str], None]) -> tuple[list[PartResult], dict]:
    """Steps 1-3 of the module docstring; returns the parts and the download record written to DIR/download.json."""
    parts_dir = directory / PARTS_DIR
    parts_dir.mkdir(parents=True, exist_ok=True)
    opener = make_opener()
    results = []
    for part in parts:
        published, why_none = fetch_published(part, opener, timeout=timeout, retries=min(retries, 3),
                                              retry_wait=retry_wait, log=log)
        if published is None:
            log(f"{part.name}: no checksum available ({why_none}); checking the size against Content-Length only")
        _warn_disk_space(part, published, parts_dir, log)
        results.append(download_part(part, parts_dir, opener, published=published, why_none=why_none, timeout=timeout,
                                     retries=retries, retry_wait=retry_wait, progress=progress, log=log))
        log(f"{part.name}: {results[-1].bytes} bytes; {results[-1].check}")
    members = unpack_parts([Path(r.path) for r in results], directory, progress=progress)
    root = find_clip_root(directory)
    state = {"kind": kind, "root": os.path.relpath(root, directory), "members": members,
             "parts": [asdict(r) for r in results]}
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
                     retry_wait: float = 1.0, progress: bool = True,
                     log: Callable[[str], None] = log_stderr) -> DownloadReport:
    """Download, verify and unpack `kind`'s archive into `directory`, then write its clip manifest.

    `base_url` replaces https://archive.org/download (a mirror); the manifest goes to `manifest`
    [default: DIR/manifest.json]; `on_error` and `workers` are build_manifest's.
    """
    directory = Path(directory).absolute()
    manifest_path = Path(manifest) if manifest is not None else directory / "manifest.json"
    parts = archive_parts(kind, base_url)
    state = _read_state(directory / STATE_FILE, kind, parts)
    if state is None:
        results, state = _download_and_unpack(kind, parts, directory, keep_parts=keep_parts, timeout=timeout,
                                              retries=retries, retry_wait=retry_wait, progress=progress, log=log)
        members = state["members"]
    else:
        log(f"{directory / STATE_FILE}: the archive was downloaded and unpacked before; building the manifest")
        results = [PartResult(p["name"], p["path"] if p["path"] and Path(p["path"]).exists() else "", p["bytes"], 0,
                              p["check"])
                   for p in state["parts"]]
        members = 0
    root = (directory / state["root"]).resolve()
    m, skipped = build_manifest(root, kind, on_error=on_error, workers=workers)
    m.save(manifest_path)
    return DownloadReport(kind, str(directory), str(root), str(manifest_path), results, members, len(m.clips), skipped)
