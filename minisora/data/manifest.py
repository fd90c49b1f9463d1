"""Clip manifests: one JSON record per clip of a TECO-layout root, the input of `minisora encode`.

    {"version": 1, "kind": "dmlab", "root": "/data/dmlab",
     "clips": [{"split": "test", "path": "test/0/000001.npz", "frames": 300, "height": 64,
                "width": 64, "has_actions": true, "bytes": 3688746, "sha256": null}, ...],
     "skipped": [{"path": "train/0/bad.npz", "reason": "not an npz (zip) archive"}]}

`skipped` (present only when the scan left clips out, with --on-error skip) lists the bad clips,
so encode can report them and record them in the store; it is not part of `digest()`.

Records are sorted by (split, path), so scanning the same files twice gives the same manifest,
and `digest()` (kind + records, not the root) identifies the data wherever it lives. Paths are
relative to the root and can never point outside it: `load` refuses absolute paths, `..` and
symlinks that resolve elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

from tqdm import tqdm

from minisora.data.clips import KINDS, ClipError, clip_files, clip_suffix, probe_clip
from minisora.errors import MinisoraError, MinisoraWarning

SPLITS = ("train", "test")
VERSION = 1
_PROGRESS_MIN_CLIPS = 8  # show a progress bar when scanning more clips than this


class ManifestError(MinisoraError, ValueError):
    """A manifest file that cannot be used; the message names the file and the problem."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass
class ManifestClip:
    split: str
    path: str  # posix, relative to root; includes the split: "train/0/000001.npz"
    frames: int
    height: int
    width: int
    has_actions: bool
    bytes: int  # on-disk size of every file of the clip (minecraft: mp4 + actions npz)
    sha256: str | None = None  # of those files' bytes, concatenated in that order


@dataclass
class Manifest:
    kind: str
    root: str  # absolute path of the scanned root
    clips: list[ManifestClip]
    version: int = VERSION
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}: bad clips left out (on_error="skip")

    def save(self, path) -> None:
        """Write JSON atomically (a temporary file, then os.replace), creating parent directories."""
        path = Path(path)
        if path.is_dir():
            raise ManifestError(path, "is a directory; the manifest is a file, e.g. DIR/manifest.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        header = json.dumps({"version": self.version, "kind": self.kind, "root": self.root})  # '{...}'
        records = ",\n".join(json.dumps(_record(c)) for c in self.clips)  # one clip per line: diffable
        skipped = ",\n".join(json.dumps(x) for x in self.skipped)
        skipped = f',\n"skipped": [\n{skipped}\n]' if self.skipped else ""  # only when clips were left out
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            tmp.write_text(f'{header[:-1]}, "clips": [\n{records}\n]{skipped}}}\n')
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path, root=None) -> Manifest:
        """Read a manifest; `root` overrides the recorded root (the data moved). Validates every record."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise ManifestError(path, "file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ManifestError(path, f"not a JSON manifest ({e})") from e
        if not isinstance(doc, dict) or not {"version", "kind", "root", "clips"} <= doc.keys():
            raise ManifestError(path, "not a manifest: expected an object with version, kind, root, clips")
        if doc["version"] != VERSION:
            raise ManifestError(path, f"manifest version {doc['version']!r} is not supported "
                                      f"(this code reads {VERSION})")
        if doc["kind"] not in KINDS:
            raise ManifestError(path, f"unknown kind {doc['kind']!r}; expected one of {', '.join(KINDS)}")
        if not isinstance(doc["clips"], list):
            raise ManifestError(path, "`clips` must be a list")
        root = Path(root if root is not None else doc["root"]).absolute()
        clips = [_clip_record(path, i, rec, doc["kind"]) for i, rec in enumerate(doc["clips"])]
        skipped = doc.get("skipped", [])
        if not isinstance(skipped, list) or not all(isinstance(x, dict) and isinstance(x.get("path"), str)
                                                    and isinstance(x.get("reason"), str) for x in skipped):
            raise ManifestError(path, "`skipped` must be a list of {\"path\": ..., \"reason\": ...} records")
        manifest = cls(kind=doc["kind"], root=str(root), clips=clips, version=doc["version"],
                       skipped=[{"path": x["path"], "reason": x["reason"]} for x in skipped])
        seen: set[str] = set()
        resolved_dirs: dict[str, str] = {}  # each directory is resolved once, not once per clip
        for i, clip in enumerate(clips):
            if clip.path in seen:
                raise ManifestError(path, f"clip {i}: path {clip.path!r} is listed twice")
            seen.add(clip.path)
            try:
                _join_inside(manifest.root, clip.path, resolved_dirs)
            except ValueError as e:
                raise ManifestError(path, f"clip {i}: {e}") from e
        return manifest

    def digest(self) -> str:
        """sha256 hex of the kind and the clip records as canonical JSON; the root is not included."""
        doc = {"kind": self.kind, "clips": [_record(c) for c in self.clips]}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def split_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for clip in self.clips:
            counts[clip.split] = counts.get(clip.split, 0) + 1
        return counts

    def by_split(self, split: str) -> list[ManifestClip]:
        return [c for c in self.clips if c.split == split]

    def abspath(self, clip: ManifestClip) -> Path:
        """root / clip.path, refusing anything that resolves outside root (.., absolute, symlinks)."""
        return Path(_join_inside(self.root, clip.path))

    def check_clip(self, clip: ManifestClip) -> None:
        """A ClipError when the clip's files no longer have the sha256 the manifest recorded (none recorded: no
        check)."""
        if clip.sha256 is None:
            return
        path = self.abspath(clip)
        try:
            sha = _sha256(clip_files(path, self.kind))
        except OSError as e:
            raise ClipError(path, f"cannot read ({e.strerror or e})") from None
        if sha != clip.sha256:
            raise ClipError(path, f"sha256 {sha[:16]} differs from the {clip.sha256[:16]} the manifest recorded "
                                  "(the clip was replaced or changed since `data manifest --checksum`)")


_FIELDS = [f.name for f in fields(ManifestClip)]
_FIELD_TYPES = {"split": str, "path": str, "frames": int, "height": int, "width": int, "has_actions": bool,
                "bytes": int}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _record(clip: ManifestClip) -> dict:
    return {name: getattr(clip, name) for name in _FIELDS}  # dataclasses.asdict, minus its deep copies


def _join_inside(root: str, rel: str, resolved_dirs: dict[str, str] | None = None) -> str:
    """root/rel, or ValueError when rel is absolute, has '..', or resolves (symlinks) outside root.

    `resolved_dirs` caches realpath() of directories across calls, so checking 200k clips costs
    one lstat per clip plus one realpath per directory.
    """
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel or ".." in parts or "" in parts:
        raise ValueError(f"clip path {rel!r} must be relative to the root, without '..'")
    cache = {} if resolved_dirs is None else resolved_dirs
    real_root = cache.get("") or cache.setdefault("", os.path.realpath(root))
    parent = rel.rpartition("/")[0]
    if parent not in cache:
        cache[parent] = os.path.realpath(os.path.join(root, parent))
    real = os.path.join(cache[parent], parts[-1])
    if os.path.islink(real):
        real = os.path.realpath(real)
    if not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise ValueError(f"clip path {rel!r} resolves to {real}, outside the root {root}")
    return os.path.join(root, rel)


def _clip_record(path: Path, i: int, rec, kind: str) -> ManifestClip:
    """One validated clip record of manifest `path`."""
    if not isinstance(rec, dict) or not _FIELD_TYPES.keys() <= rec.keys() or not rec.keys() <= set(_FIELDS):
        raise ManifestError(path, f"clip {i}: expected the fields {', '.join(_FIELDS)}, got {rec!r}")
    for name, typ in _FIELD_TYPES.items():
        value = rec[name]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ManifestError(path, f"clip {i}: `{name}` must be {typ.__name__}, got {value!r}")
    if rec["split"] not in SPLITS:
        raise ManifestError(path, f"clip {i}: split {rec['split']!r} is not one of {', '.join(SPLITS)}")
    if not rec["path"].startswith(rec["split"] + "/") or not rec["path"].endswith(clip_suffix(kind)):
        raise ManifestError(path, f"clip {i}: path {rec['path']!r} is not a {clip_suffix(kind)} file "
                                  f"under {rec['split']}/")
    if rec["frames"] < 1 or rec["height"] < 1 or rec["width"] < 1 or rec["bytes"] < 0:
        raise ManifestError(path, f"clip {i}: frames, height, width must be >= 1 and bytes >= 0, got {rec!r}")
    sha = rec.get("sha256")
    if sha is not None and not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
        raise ManifestError(path, f"clip {i}: `sha256` must be null or 64 lowercase hex digits, got {sha!r}")
    return ManifestClip(**rec)


def _sha256(files: list[Path]) -> str:
    h = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def _scan_one(job: tuple[Path, str, str, str, bool, int]) -> ManifestClip | ClipError:
    """Probe one clip; a bad clip comes back as its ClipError (so a pool keeps going)."""
    root, split, rel, kind, checksum, min_frames = job
    path = root / rel
    try:
        try:
            _join_inside(str(root), rel)
        except ValueError as e:
            raise ClipError(path, str(e)) from None
        info = probe_clip(path, kind)
        if info.frames < min_frames:
            raise ClipError(path, f"has {info.frames} frames < {min_frames} required")
        files = clip_files(path, kind)
        size = sum(f.stat().st_size for f in files)
        sha = _sha256(files) if checksum else None
    except ClipError as e:
        return e
    except OSError as e:
        return ClipError(path, f"cannot read ({e.strerror or e})")
    return ManifestClip(split, rel, info.frames, info.height, info.width, info.has_actions, size, sha)


def build_manifest(root, kind, checksum=False, on_error="fail", min_frames=1,
                   workers=1) -> tuple[Manifest, list[tuple[str, str]]]:
    """Scan ROOT/{train,test}/**/<name>.{npz|mp4} into a Manifest, probing every clip.

    Hidden files (".name.npz", e.g. macOS "._" files) are not clips.
    on_error="fail" raises the ClipError of the first bad clip (in (split, path) order);
    "skip" leaves bad clips out and returns them as (relative path, reason). For minecraft the
    .npz files are the videos' action siblings, not clips.
    """
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    if min_frames < 1:
        raise ValueError(f"min_frames must be >= 1, got {min_frames}")
    suffix = clip_suffix(kind)
    root = Path(root).resolve()
    if not root.is_dir():
        raise ClipError(root, "not a directory")
    splits = sorted(s for s in SPLITS if (root / s).is_dir())
    if not splits:
        raise ClipError(root, f"has no train/ or test/ directory; "
                              f"expected TECO layout ROOT/{{train,test}}/<subdir>/<name>{suffix}")
    jobs = []
    for split in splits:
        found = (root / split).rglob(f"*{suffix}")
        rels = sorted(p.relative_to(root).as_posix() for p in found if p.is_file() and not p.name.startswith("."))
        jobs += [(root, split, rel, kind, checksum, min_frames) for rel in rels]

    progress = tqdm(total=len(jobs), desc=f"probing {kind} clips", unit="clip", file=sys.stderr,
                    disable=True if len(jobs) <= _PROGRESS_MIN_CLIPS else None)
    pool = ProcessPoolExecutor(workers) if workers > 1 and len(jobs) > 1 else None
    results = pool.map(_scan_one, jobs, chunksize=max(1, len(jobs) // (8 * workers))) if pool else map(_scan_one, jobs)
    clips: list[ManifestClip] = []
    skipped: list[tuple[str, str]] = []
    try:
        with progress:
            for (_, _, rel, *_), result in zip(jobs, results):
                progress.update()
                if isinstance(result, ManifestClip):
                    clips.append(result)
                elif on_error == "fail":
                    raise result
                else:
                    skipped.append((rel, result.problem if result.path == str(root / rel) else str(result)))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)  # on failure, do not wait for the rest of the scan
    warn_missing_actions(kind, root, clips)
    recorded = [{"path": p, "reason": r} for p, r in skipped]
    return Manifest(kind=kind, root=str(root), clips=clips, skipped=recorded), skipped


def warn_missing_actions(kind: str, root: Path, clips: list[ManifestClip]) -> None:
    """One warning when the dataset card says every clip records actions and some of these have none: encode
    stores theirs as -1 (no action), which an action-conditioned model then reads as "no action taken"."""
    from minisora.data import load_dataset_card

    missing = [c for c in clips if not c.has_actions]
    if not missing:
        return
    try:
        card_has_actions = "actions" in load_dataset_card(kind).get("clip", {}).get("arrays", {})
    except (OSError, ValueError):  # no card for this kind: nothing to compare with
        return
    if card_has_actions:
        warnings.warn(f"{root / missing[0].path}: has no `actions` array, and {len(missing) - 1} other clip(s) "
                      f"neither, though the {kind} dataset card says each clip records one action per frame; "
                      "encode stores them as -1 (no action)", MinisoraWarning, stacklevel=2)
