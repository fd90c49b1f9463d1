"""`minisora data download` against a local HTTP server (127.0.0.1, with Range support) serving a
real small tar of TECO-layout npz clips split into the card's parts, and a fake <item>_files.xml."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from minisora.data import load_dataset_card
from minisora.data.download import (PARTS_DIR, STATE_FILE, DownloadError, archive_parts, download_dataset,
                                    parse_files_xml)
from minisora.data.manifest import Manifest, build_manifest

CLIPS = {"train/0/000000.npz": 5, "train/0/000001.npz": 6, "train/1/001000.npz": 7, "test/0/000000.npz": 4}


# --- a small archive server ---------------------------------------------------------------------


@dataclass
class Served:
    path: str
    range: str | None
    status: int
    sent: int


@dataclass
class Site:
    files: dict[str, bytes] = field(default_factory=dict)  # URL path -> body
    redirects: dict[str, str] = field(default_factory=dict)  # URL path -> Location
    cut: dict[str, int] = field(default_factory=dict)  # URL path -> bytes to send once before dropping the connection
    ignore_range: bool = False
    log: list[Served] = field(default_factory=list)

    def served(self, path: str) -> list[Served]:
        return [s for s in self.log if s.path == path]


class Handler(BaseHTTPRequestHandler):
    site: Site

    def do_GET(self):
        site, path, range_ = self.server.site, self.path, self.headers.get("Range")
        if path in site.redirects:
            return self._answer(302, {"Location": site.redirects[path]}, b"", range_)
        if path not in site.files:
            return self._answer(404, {}, b"not here", range_)
        body = site.files[path]
        m = re.fullmatch(r"bytes=(\d+)-", range_ or "")
        if m and not site.ignore_range:
            start = int(m.group(1))
            if start >= len(body):
                return self._answer(416, {"Content-Range": f"bytes */{len(body)}"}, b"", range_)
            headers = {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"}
            return self._answer(206, headers, body[start:], range_)
        return self._answer(200, {}, body, range_)

    def _answer(self, status, headers, body, range_):
        send = body[: self.server.site.cut.pop(self.path)] if self.path in self.server.site.cut else body
        # logged before the body goes out: a client that has read it all may check the log at once, before this
        # thread runs again (a loaded machine showed that race)
        self.server.site.log.append(Served(self.path, range_, status, len(send)))
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(send)  # fewer bytes than Content-Length: a dropped connection (HTTP/1.0 closes now)

    def log_message(self, *args):
        pass


@pytest.fixture
def site():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.site = Site()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    server.site.base = f"http://127.0.0.1:{server.server_address[1]}/download"
    yield server.site
    server.shutdown()
    server.server_close()


# --- a real small TECO archive, split like the card's ----------------------------------------------


def clip_tree(root: Path) -> Path:
    for i, (rel, frames) in enumerate(CLIPS.items()):
        rng = np.random.default_rng(i)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        np.savez(root / rel, video=rng.integers(0, 256, (frames, 8, 8, 3), dtype=np.uint8),
                 actions=np.arange(frames) % 6)
    return root


def tar_bytes(entries: list[tarfile.TarInfo | tuple[str, Path]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
            else:
                tar.add(entry[1], arcname=entry[0])
    return buffer.getvalue()


def split(data: bytes, n: int) -> list[bytes]:
    cuts = [len(data) * k // n + 7 * k for k in range(n)] + [len(data)]  # uneven, mid-member
    return [data[a:b] for a, b in zip(cuts, cuts[1:])]


def files_xml(name: str, body: bytes, md5: str | None = None) -> bytes:
    md5 = md5 or hashlib.md5(body).hexdigest()
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<files>\n  <file name="{name}" source="original">\n'
            f"    <mtime>1665000000</mtime>\n    <size>{len(body)}</size>\n    <md5>{md5}</md5>\n"
            f"    <crc32>00000000</crc32>\n    <sha1>{hashlib.sha1(body).hexdigest()}</sha1>\n"
            f"    <format>Unknown</format>\n  </file>\n"
            f'  <file name="{name}_meta.xml" source="metadata"><size>1</size></file>\n</files>\n').encode()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return clip_tree(tmp_path_factory.mktemp("src") / "dmlab")


def publish(site: Site, archive: bytes, *, checksums: bool = True, bad_md5: int | None = None) -> list[bytes]:
    """Serve `archive` split into the dmlab card's parts under site.base/<item>/<file> (+ <item>_files.xml)."""
    parts = archive_parts("dmlab", site.base)
    pieces = split(archive, len(parts))
    for i, (part, body) in enumerate(zip(parts, pieces)):
        site.files[urlpath(part.url)] = body
        if checksums:
            site.files[urlpath(part.files_xml_url)] = files_xml(part.name, body, "0" * 32 if i == bad_md5 else None)
    return pieces


def urlpath(url: str) -> str:
    return "/" + url.split("/", 3)[3]


def dmlab_archive(source: Path) -> bytes:
    return tar_bytes([("dmlab", source)])  # the archive unpacks to one folder, dmlab/{train,test}


def run(site, out, **kw):
    return download_dataset("dmlab", out, base_url=site.base, progress=False, retry_wait=0.0, log=lambda _: None, **kw)


# --- tests --------------------------------------------------------------------------------------


def test_parts_come_from_the_dataset_card():
    card = load_dataset_card("dmlab")["download"]
    parts = archive_parts("dmlab")
    assert [p.item for p in parts] == card["items"]
    assert [p.url for p in parts] == card["files"]
    assert parts[0].files_xml_url == card["files"][0].rsplit("/", 1)[0] + f"/{card['items'][0]}_files.xml"
    mirror = archive_parts("minecraft", "http://mirror.example/ia/")
    assert len(mirror) == len(load_dataset_card("minecraft")["download"]["items"])
    assert mirror[-1].url == f"http://mirror.example/ia/{mirror[-1].item}/{mirror[-1].name}"
    with pytest.raises(DownloadError, match=r"--base-url 'file:///srv/ia' is not an http\(s\) URL"):
        archive_parts("dmlab", "file:///srv/ia")


def test_parse_files_xml_reads_the_entry_and_rejects_bad_digests():
    body = b"abc"
    got = parse_files_xml(files_xml("x.tar.partaa", body), "x.tar.partaa", "u")
    assert (got.size, got.md5, got.sha1) == (3, hashlib.md5(body).hexdigest(), hashlib.sha1(body).hexdigest())
    assert parse_files_xml(files_xml("x.tar.partaa", body), "other", "u") is None
    with pytest.raises(DownloadError, match="u: x.tar.partaa has md5 'zz', not a md5 hex digest"):
        parse_files_xml(files_xml("x.tar.partaa", body, md5="zz"), "x.tar.partaa", "u")
    with pytest.raises(DownloadError, match="u: not an Internet Archive file list"):
        parse_files_xml(b"<html>moved</html>", "x", "u")


def test_full_download_unpack_manifest_then_rerun_fetches_nothing(site, source, tmp_path):
    pieces = publish(site, dmlab_archive(source))
    out = tmp_path / "data"
    report = run(site, out)

    parts = archive_parts("dmlab", site.base)
    assert ([(p.name, p.bytes, p.fetched) for p in report.parts]
            == [(p.name, len(b), len(b)) for p, b in zip(parts, pieces)])
    assert all(p.check == "size, md5, sha1 match the archive's file list" for p in report.parts)
    assert ([(s.range, s.status, s.sent) for p in parts for s in site.served(urlpath(p.url))]
            == [(None, 200, len(b)) for b in pieces])
    assert [(out / PARTS_DIR / p.name).read_bytes() for p in parts] == pieces
    for rel in CLIPS:
        assert (out / "dmlab" / rel).read_bytes() == (source / rel).read_bytes()
    assert report.root == str((out / "dmlab").resolve())
    assert report.members == 1 + 2 + 3 + len(CLIPS)  # dmlab/, train/, test/, train/0, train/1, test/0, clips
    m = Manifest.load(out / "manifest.json")
    assert report.clips == len(m.clips) == len(CLIPS)
    assert m.digest() == build_manifest(source, "dmlab")[0].digest()
    assert [c.frames for c in m.clips] == [CLIPS[c.path] for c in m.clips]

    served = len(site.log)
    again = run(site, out, manifest=tmp_path / "m2.json")
    assert len(site.log) == served  # the download record says it is all there: no request at all
    assert (again.members, [p.fetched for p in again.parts]) == (0, [0, 0, 0])
    assert Manifest.load(tmp_path / "m2.json").digest() == m.digest()


def test_resume_requests_only_the_missing_bytes(site, source, tmp_path):
    pieces = publish(site, dmlab_archive(source))
    parts = archive_parts("dmlab", site.base)
    out = tmp_path / "data"
    (out / PARTS_DIR).mkdir(parents=True)
    have = len(pieces[0]) // 3
    (out / PARTS_DIR / f"{parts[0].name}.part").write_bytes(pieces[0][:have])

    report = run(site, out)
    first = site.served(urlpath(parts[0].url))
    assert [(s.range, s.status, s.sent) for s in first] == [(f"bytes={have}-", 206, len(pieces[0]) - have)]
    assert report.parts[0].fetched == len(pieces[0]) - have
    assert report.parts[0].check == "size, md5, sha1 match the archive's file list"  # md5 covers the resumed prefix too
    assert (out / PARTS_DIR / parts[0].name).read_bytes() == pieces[0]
    assert not (out / PARTS_DIR / f"{parts[0].name}.part").exists()
    assert report.clips == len(CLIPS)


def test_complete_part_file_is_not_fetched_again(site, source, tmp_path):
    pieces = publish(site, dmlab_archive(source), checksums=False)  # size known only from the server
    parts = archive_parts("dmlab", site.base)
    out = tmp_path / "data"
    (out / PARTS_DIR).mkdir(parents=True)
    (out / PARTS_DIR / f"{parts[0].name}.part").write_bytes(pieces[0])  # stopped after the download, before the rename
    report = run(site, out)
    assert ([(s.range, s.status, s.sent) for s in site.served(urlpath(parts[0].url))]
            == [(f"bytes={len(pieces[0])}-", 416, 0)])
    assert (report.parts[0].fetched, report.clips) == (0, len(CLIPS))
    assert report.parts[0].check.startswith(f"size {len(pieces[0])} matches Content-Length; no checksum available")


def test_truncated_archive_is_an_error(site, source, tmp_path):
    archive = dmlab_archive(source)
    publish(site, archive[:3000])
    with pytest.raises(DownloadError, match=r"dmlab.tar.partaa .. dmlab.tar.partac: not a complete tar archive: "
                                            r".* after 3000 of 3000 bytes"):
        run(site, tmp_path / "data")


def test_dropped_connection_is_retried_from_where_it_stopped(site, source, tmp_path):
    pieces = publish(site, dmlab_archive(source))
    second = urlpath(archive_parts("dmlab", site.base)[1].url)
    site.cut[second] = 1000
    report = run(site, tmp_path / "data")
    assert [(s.range, s.sent) for s in site.served(second)] == [(None, 1000), ("bytes=1000-", len(pieces[1]) - 1000)]
    assert report.parts[1].fetched == len(pieces[1])
    assert report.clips == len(CLIPS)


def test_server_ignoring_range_restarts_the_part(site, source, tmp_path):
    pieces = publish(site, dmlab_archive(source))
    parts = archive_parts("dmlab", site.base)
    site.ignore_range = True
    out = tmp_path / "data"
    (out / PARTS_DIR).mkdir(parents=True)
    (out / PARTS_DIR / f"{parts[2].name}.part").write_bytes(b"x" * 10)  # wrong bytes: must not survive
    report = run(site, out)
    assert [(s.range, s.status) for s in site.served(urlpath(parts[2].url))] == [("bytes=10-", 200)]
    assert (out / PARTS_DIR / parts[2].name).read_bytes() == pieces[2]
    assert report.parts[2].check == "size, md5, sha1 match the archive's file list"


def test_checksum_mismatch_names_the_file_and_unpacks_nothing(site, source, tmp_path):
    pieces = publish(site, dmlab_archive(source), bad_md5=1)
    parts = archive_parts("dmlab", site.base)
    out = tmp_path / "data"
    bad = out / PARTS_DIR / f"{parts[1].name}.bad"
    with pytest.raises(DownloadError) as e:
        run(site, out)
    assert str(e.value) == (f"{out / PARTS_DIR / parts[1].name}: md5 is {hashlib.md5(pieces[1]).hexdigest()} "
                            f"but the archive's "
                            f"file list says {'0' * 32}; nothing was unpacked; the download is kept as {bad} "
                            "(delete it and run again to download afresh)")
    assert bad.read_bytes() == pieces[1]
    assert not (out / "dmlab").exists() and not (out / STATE_FILE).exists() and not (out / "manifest.json").exists()
    assert site.served(urlpath(parts[2].url)) == []  # stopped at the bad part


def test_without_files_xml_the_size_is_checked_against_content_length(site, source, tmp_path):
    pieces = publish(site, dmlab_archive(source), checksums=False)
    parts = archive_parts("dmlab", site.base)
    report = run(site, tmp_path / "data")
    assert [p.check for p in report.parts] == [
        f"size {len(b)} matches Content-Length; no checksum available ({p.files_xml_url}: HTTP 404 Not Found)"
        for p, b in zip(parts, pieces)]
    assert report.clips == len(CLIPS)


def test_redirects_are_followed_over_http_with_the_range_header(site, source, tmp_path):
    pieces = publish(site, dmlab_archive(source))
    parts = archive_parts("dmlab", site.base)
    first = urlpath(parts[0].url)
    site.files["/node7" + first] = site.files.pop(first)  # the Internet Archive redirects to a data node
    site.redirects[first] = site.base.rsplit("/", 1)[0] + "/node7" + first
    out = tmp_path / "data"
    (out / PARTS_DIR).mkdir(parents=True)
    (out / PARTS_DIR / f"{parts[0].name}.part").write_bytes(pieces[0][:100])
    run(site, out)
    assert ([(s.range, s.status, s.sent) for s in site.served("/node7" + first)]
            == [("bytes=100-", 206, len(pieces[0]) - 100)])
    assert (out / PARTS_DIR / parts[0].name).read_bytes() == pieces[0]


@pytest.mark.parametrize("target", ["ftp://127.0.0.1/dmlab.tar", "file:///etc/passwd"])
def test_redirects_to_other_schemes_are_refused(site, source, tmp_path, target):
    publish(site, dmlab_archive(source), checksums=False)
    first = urlpath(archive_parts("dmlab", site.base)[0].url)
    site.redirects[first] = target
    out = tmp_path / "data"
    with pytest.raises(DownloadError, match=r"edirect.*" + re.escape(target)):
        run(site, out)
    assert list((out / PARTS_DIR).iterdir()) == []


@pytest.mark.parametrize("evil", ["file", "symlink"])
def test_tar_members_escaping_dir_are_refused(site, source, tmp_path, evil):
    if evil == "file":
        escape = tarfile.TarInfo("../escaped.txt")
        escape.size = 0
    else:
        escape = tarfile.TarInfo("dmlab/up")
        escape.type, escape.linkname = tarfile.SYMTYPE, "../../.."
    publish(site, tar_bytes([("dmlab/train/0/000000.npz", source / "train/0/000000.npz"), escape]))
    out = tmp_path / "data"
    stopped = rf"the unpack stopped there, 1 earlier member\(s\) are in {re.escape(str(tmp_path / 'data'))}"
    with pytest.raises(DownloadError, match=rf"refused tar member '{re.escape(escape.name)}' \(.*\); {stopped}"):
        run(site, out)
    assert (out / "dmlab/train/0/000000.npz").read_bytes() == (source / "train/0/000000.npz").read_bytes()
    assert not (tmp_path / "escaped.txt").exists() and not (out / "dmlab/up").is_symlink()
    assert not (out / STATE_FILE).exists()


def test_cli_downloads_deletes_parts_and_reports_errors(site, source, tmp_path):
    publish(site, dmlab_archive(source))
    out, manifest = tmp_path / "data", tmp_path / "dmlab.manifest.json"
    args = ["data", "download", "dmlab", str(out), "--base-url", site.base, "--no-progress"]
    result = CliRunner().invoke(app, args + ["--manifest", str(manifest), "--delete-parts"])
    assert result.exit_code == 0, result.output
    assert f"wrote {manifest}: {len(CLIPS)} clips, 0 skipped" in result.stdout
    assert Manifest.load(manifest).digest() == build_manifest(source, "dmlab")[0].digest()
    assert not (out / PARTS_DIR).exists()  # --delete-parts after the unpack

    publish(site, dmlab_archive(source), bad_md5=0)
    result = CliRunner().invoke(app, args[:3] + [str(tmp_path / "other")] + args[4:])
    assert result.exit_code == 1
    name = archive_parts("dmlab")[0].name
    assert f"error: {tmp_path / 'other' / PARTS_DIR / name}: md5 is " in result.stderr
