"""Where the archive's parts are (the dataset card) and what the Internet Archive publishes about them.

The card's file URLs have the form <base>/<item>/<file>; each item also publishes
<base>/<item>/<item>_files.xml, its file list with size, md5 and sha1 of every file.
"""

from __future__ import annotations

import http.client
import re
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from typing import Callable
from urllib.parse import quote

from minisora.data import CARDS_DIR, load_dataset_card
from minisora.data.download.common import ArchivePart, DownloadError, Published, log_stderr
from minisora.data.download.http import USER_AGENT, check_http_url, retrying

FILES_XML_MAX = 16 << 20  # an item's file list is a few kB; refuse anything this large
_HEX = {"md5": re.compile(r"[0-9a-f]{32}"), "sha1": re.compile(r"[0-9a-f]{40}")}


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
        check_http_url(base_url, "--base-url")
    parts = []
    for item, url in zip(items, files):
        card_base, item_in_url, name = url.rsplit("/", 2)
        if item_in_url != item or not name:
            raise DownloadError(f"{card}: file URL {url!r} is not <base>/{item}/<file>")
        base = card_base if base_url is None else base_url.rstrip("/")
        check_http_url(base, f"{card}: download base of")
        item_url = f"{base}/{quote(item)}"
        parts.append(ArchivePart(item, name, f"{item_url}/{quote(name)}", f"{item_url}/{quote(item)}_files.xml"))
    return parts



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
        raise DownloadError(f"{source}: not an Internet Archive file list "
                            f"(root element <{root.tag}>, expected <files>)")
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
                    log: Callable[[str], None] = log_stderr) -> tuple[Published | None, str]:
    """(what <item>_files.xml says about the part, "") or (None, why there is nothing to check against)."""
    url = part.files_xml_url

    def get() -> bytes:
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        with opener.open(request, timeout=timeout) as response:
            return response.read(FILES_XML_MAX + 1)

    try:
        data = retrying(url, get, retries, retry_wait, log)
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
