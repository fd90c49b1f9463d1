"""Unpacking the downloaded parts safely: one tar stream (`cat part* | tar x`) through tarfile's `data` filter."""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

from tqdm import tqdm

from minisora.data.download.common import CHUNK, PARTS_DIR, DownloadError
from minisora.data.manifest import SPLITS


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
                                            f"the unpack stopped there, {members} earlier member(s) "
                                            f"are in {dest}") from None
                    members += 1
        except (tarfile.ReadError, EOFError) as e:
            raise DownloadError(f"{names}: not a complete tar archive: {e} "
                                f"after {concatenated.consumed} of {total} bytes") from None
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
        level = sorted(c for d in level for c in d.iterdir()
                       if c.is_dir() and c.name not in skip and c.name not in SPLITS)
    raise DownloadError(f"{directory}: the unpacked archive has no train/ or test/ folder within {depth} levels")


# --- the whole command --------------------------------------------------------------------------
