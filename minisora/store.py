"""The Zarr latent store: schema, shard writer, reader helpers, statistics and verification.

Layout (schema v1), one Zarr v3 group per store, one subgroup per split::

    STORE/zarr.json                  root attributes: schema, VAE, source, geometry, statistics
    STORE/manifest.json              the manifest the store was encoded from (a copy)
    STORE/<split>/mean               (N, T, C, h, w) float16  posterior mean, NaN past `length`
    STORE/<split>/logvar             (N, T, C, h, w) float16  posterior log-variance (absent for
                                                               deterministic encoders)
    STORE/<split>/actions            (N, T) int16, -1 where a clip has none / past `length`
    STORE/<split>/length             (N,) int32 latent frames per clip (0 = skipped clip)
    STORE/<split>/_commits/shard-K.json   commit marker of shard K (clip keys, checksums, sums)

N is the number of manifest clips of the split and T the longest clip in latent frames. Every
array is chunked one clip per chunk and sharded `clips_per_shard` clips per shard, with the shard
boundaries of all arrays aligned, so shard K of every array is one file per array written by one
process. A shard counts only once a readable marker exists; the marker records the sha256 of each
shard file, so `verify` catches any flipped byte, and re-running encode skips committed shards
(and redoes those whose marker is missing or broken). New stores (root attribute chunk_checksum =
"crc32c") also end every chunk with a crc32c of its stored bytes, which zarr checks on every read;
older stores (no such attribute) read as before.

Opening a complete store read-only checks its `vae` and `latent_stats` attributes against the digests
recorded when it was finalized (minisora/store_meta.py).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.storage import FsspecStore, LocalStore

from minisora.data.clips import ACTION_DTYPE
from minisora.store_meta import check_meta, meta_digests
from minisora.store_schema import (ARRAYS_5D, SCHEMA_VERSION, ShardCommit, SplitLayout, StoreError, _fs_and_root,
                                   _sha256, channel_sums, clips_per_shard_for, narrow)

__all__ = ["ARRAYS_5D", "SCHEMA_VERSION", "LatentStore", "ShardCommit", "SplitLayout", "StoreError", "channel_sums",
           "clips_per_shard_for", "narrow"]


class LatentStore:
    """Open (or create) a latent store at a local path or fsspec URL (`memory://`, `s3://`, ...).

    Args:
        url: the store's root, a local path or an fsspec URL.
        mode: "r" opens an existing store read-only and checks it is one (StoreError if not); any other mode
            ("a", as a resumed encode uses) opens or creates the Zarr group for writing (`create` uses "w").
    """

    def __init__(self, url: str | Path, mode: str = "r"):
        self.url = str(url)
        self.fs, self.root, self.local = _fs_and_root(self.url)
        if mode == "r" and not self.fs.exists(f"{self.root}/zarr.json"):
            raise StoreError(f"{self.url}: not a latent store (no zarr.json)")
        zstore = (LocalStore(self.root, read_only=mode == "r") if self.local
                  else FsspecStore.from_url(self.url, read_only=mode == "r"))
        try:
            self.group = zarr.open_group(zstore, mode="r" if mode == "r" else "a")
        except Exception as e:  # zarr raises several types for broken metadata
            raise StoreError(f"{self.url}: cannot open zarr group ({e})") from e
        self.attrs = dict(self.group.attrs)
        self._array_meta: dict[tuple[str, str], bytes] = {}  # zarr.json of each array, for read_shard
        if mode == "r" and self.attrs.get("schema") != "minisora.latents":
            raise StoreError(f"{self.url}: not a minisora latent store (attributes lack schema='minisora.latents')")
        if mode == "r" and self.attrs.get("complete"):
            check_meta(self.url, self.attrs)

    # ---------------------------------------------------------------- creation
    @classmethod
    def create(cls, url: str | Path, attrs: dict, layouts: dict[str, SplitLayout], deterministic: bool,
               manifest_json: str, compression_level: int = 3, chunk_checksum: bool = True) -> "LatentStore":
        """Create an empty store (arrays full of padding) with the given attributes.

        With `chunk_checksum` (the default; False only makes stores like those of earlier versions) every
        chunk ends in a crc32c of its stored bytes, so zarr refuses a corrupted chunk even when it is read
        alone, without the shard's sha256 in its commit marker.
        """
        fs, root, local = _fs_and_root(str(url))
        if local:
            Path(root).mkdir(parents=True, exist_ok=True)
        store = cls(url, mode="w")
        full = {"schema": "minisora.latents", "schema_version": SCHEMA_VERSION, **attrs,
                "splits": {s: asdict(lay) for s, lay in layouts.items()}, "deterministic": deterministic,
                "complete": False, "chunk_checksum": "crc32c" if chunk_checksum else None}
        compressors = [ZstdCodec(level=compression_level)] if compression_level > 0 else []
        compressors += [Crc32cCodec()] if chunk_checksum else []
        cfg = {"write_empty_chunks": True}
        for split, lay in layouts.items():
            g = store.group.require_group(split)
            names = ("mean",) if deterministic else ARRAYS_5D
            for name in names:
                g.create_array(name, shape=(lay.clips, lay.frames, lay.channels, lay.height, lay.width),
                               chunks=(1, lay.frames, lay.channels, lay.height, lay.width),
                               shards=(lay.clips_per_shard, lay.frames, lay.channels, lay.height, lay.width),
                               dtype="float16", fill_value=np.nan, compressors=compressors or None, config=cfg)
            g.create_array("actions", shape=(lay.clips, lay.frames), chunks=(1, lay.frames),
                           shards=(lay.clips_per_shard, lay.frames), dtype=ACTION_DTYPE.name, fill_value=-1,
                           compressors=compressors or None, config=cfg)
            g.create_array("length", shape=(lay.clips,), chunks=(lay.clips_per_shard,), dtype="int32",
                           fill_value=0, compressors=[Crc32cCodec()] if chunk_checksum else None, config=cfg)
        store.fs.pipe_file(f"{store.root}/manifest.json", manifest_json.encode())
        store.group.attrs.update(full)
        store.attrs = full
        return store

    def set_attrs(self, **kv) -> None:
        """Update root attributes; the digests of META_KEYS follow them (a change through here is no damage)."""
        if "meta_sha256" in self.attrs or "latent_stats" in kv:
            kv["meta_sha256"] = meta_digests({**self.attrs, **kv})
        self.group.attrs.update(kv)
        self.attrs.update(kv)

    # ---------------------------------------------------------------- geometry
    @property
    def splits(self) -> list[str]:
        return list(self.attrs["splits"])

    def layout(self, split: str) -> SplitLayout:
        if split not in self.attrs["splits"]:
            raise StoreError(f"{self.url}: no split {split!r} (has {', '.join(self.splits)})")
        return SplitLayout(**self.attrs["splits"][split])

    def array(self, split: str, name: str) -> zarr.Array:
        # write_empty_chunks: a shard of skipped clips is all fill value, and must still be a file
        return self.group[f"{split}/{name}"].with_config({"write_empty_chunks": True})

    def read(self, split: str, name: str, selection) -> np.ndarray:
        """array(split, name)[selection] (a tuple of lists selects orthogonally), a corrupt chunk a StoreError."""
        arr = self.array(split, name)
        try:
            if isinstance(selection, tuple) and any(isinstance(x, list) for x in selection):
                return arr.get_orthogonal_selection(selection)
            return arr[selection]
        except ValueError as e:  # zarr: crc32c or zstd checksum mismatch, undecodable chunk
            raise StoreError(f"{self.url}: {split}/{name} at {selection!r} cannot be read ({e}); "
                             f"the store is damaged: run `minisora store verify {self.url}`") from e

    def array_names(self) -> tuple[str, ...]:
        return (("mean",) if self.attrs["deterministic"] else ARRAYS_5D) + ("actions", "length")

    def manifest_json(self) -> dict:
        return json.loads(self.fs.cat_file(f"{self.root}/manifest.json"))

    # ---------------------------------------------------------------- shard files and commits
    def _shard_key(self, split: str, name: str, k: int) -> str:
        ndim = 1 if name == "length" else 2 if name == "actions" else 5
        return f"{split}/{name}/c/" + "/".join([str(k)] + ["0"] * (ndim - 1))

    def _marker_path(self, split: str, k: int) -> str:
        return f"{self.root}/{split}/_commits/shard-{k:05d}.json"

    def is_committed(self, split: str, k: int) -> bool:
        """Shard k has a readable commit marker; a missing or broken one means encode must (re)write it."""
        try:
            self.read_commit(split, k)
        except StoreError:
            return False
        return True

    def read_commit(self, split: str, k: int) -> ShardCommit:
        path = self._marker_path(split, k)
        try:
            return ShardCommit(**json.loads(self.fs.cat_file(path)))
        except FileNotFoundError:
            raise StoreError(f"{self.url}: shard {k} of {split} is not committed (no {path})") from None
        except (json.JSONDecodeError, TypeError) as e:
            raise StoreError(f"{self.url}: commit marker {path} is unreadable ({e})") from e

    def write_shard(self, split: str, k: int, mean: np.ndarray, logvar: np.ndarray | None,
                    actions: np.ndarray, lengths: np.ndarray, keys: list[str], skipped: list[dict]) -> ShardCommit:
        """Write shard k of a split (whole shard, all arrays), then commit it with a marker."""
        lay = self.layout(split)
        lo, hi = lay.shard_range(k)
        n = hi - lo
        assert mean.shape == (n, lay.frames, lay.channels, lay.height, lay.width), mean.shape
        where = f"{self.url} {split} shard {k}"
        blocks = {"mean": narrow(mean, np.float16, f"{where} mean"),
                  "actions": narrow(actions, ACTION_DTYPE, f"{where} actions"),
                  "length": narrow(lengths, np.int32, f"{where} lengths")}
        if (blocks["actions"] < -1).any():
            raise StoreError(f"{where}: action ids must be >= 0 (-1: none), got {int(blocks['actions'].min())}")
        if not self.attrs["deterministic"]:
            blocks["logvar"] = narrow(logvar, np.float16, f"{where} logvar")
        for name in blocks:  # an interrupted attempt may have left torn files, which zarr would read back
            path = f"{self.root}/{self._shard_key(split, name, k)}"
            if self.fs.exists(path):
                self.fs.rm(path)
        for name, block in blocks.items():
            self.array(split, name)[lo:hi] = block
        checksums = {name: _sha256(self.fs.cat_file(f"{self.root}/{self._shard_key(split, name, k)}"))
                     for name in blocks}
        commit = ShardCommit(split=split, shard=k, start=lo, stop=hi, keys=list(keys),
                             lengths=[int(x) for x in lengths], skipped=skipped, checksums=checksums,
                             sums=channel_sums(blocks["mean"], blocks.get("logvar"), lengths),
                             action_max=int(blocks["actions"].max(initial=-1)))
        marker = self._marker_path(split, k)
        tmp = marker + ".tmp"
        self.fs.makedirs(os.path.dirname(marker), exist_ok=True)
        self.fs.pipe_file(tmp, json.dumps(asdict(commit)).encode())
        self.fs.mv(tmp, marker)  # the shard becomes visible only now
        return commit

    def pending_shards(self, split: str) -> list[int]:
        return [k for k in range(self.layout(split).num_shards) if not self.is_committed(split, k)]

    # ---------------------------------------------------------------- statistics and completion
    def finalize(self) -> dict:
        """Once every shard is committed: per-channel latent statistics and `complete=True`."""
        pending = {s: self.pending_shards(s) for s in self.splits}
        if any(pending.values()):
            raise StoreError(f"{self.url}: cannot finalize, uncommitted shards: "
                             + ", ".join(f"{s}: {v}" for s, v in pending.items() if v))
        stat_split = "train" if "train" in self.splits else self.splits[0]
        total, action_max = None, -1
        for k in range(self.layout(stat_split).num_shards):
            commit = self.read_commit(stat_split, k)
            s = np.array(commit.sums["stats"], dtype=np.float64)  # (3, C): count, sum, sum of E[z^2]
            total = s if total is None else total + s
            action_max = max(action_max, commit.action_max)
        count, s1, s2 = total
        mean = s1 / np.maximum(count, 1)
        std = np.sqrt(np.maximum(s2 / np.maximum(count, 1) - mean**2, 1e-12))
        skipped = [dict(split=s, **x) for s in self.splits for k in range(self.layout(s).num_shards)
                   for x in self.read_commit(s, k).skipped]
        stats = {"split": stat_split, "mean": mean.tolist(), "std": std.tolist(), "values_per_channel": int(count[0])}
        self.set_attrs(latent_stats=stats, skipped=skipped, num_actions=action_max + 1, complete=True)
        return stats

    def require_complete(self) -> None:
        if not self.attrs.get("complete"):
            raise StoreError(f"{self.url}: store is incomplete (encode was interrupted or is still running); "
                             "re-run the same `minisora encode` command to finish it")

    # ---------------------------------------------------------------- verification
    def verify(self, progress: bool = False) -> list[str]:
        """Re-read every shard: checksums, lengths, padding, manifest coverage. Returns problems."""
        from tqdm.auto import tqdm

        problems: list[str] = []
        try:
            manifest = self.manifest_json()
        except FileNotFoundError:
            return [f"{self.url}: manifest.json is missing"]
        by_split: dict[str, list[str]] = {}
        for c in manifest["clips"]:
            by_split.setdefault(c["split"], []).append(c["path"])
        for split in self.splits:
            lay = self.layout(split)
            want = by_split.get(split, [])
            if len(want) != lay.clips:
                problems.append(f"{split}: store has {lay.clips} clips, manifest has {len(want)}")
            for k in tqdm(range(lay.num_shards), desc=f"verify {split}", disable=not progress, leave=False):
                problems += self._verify_shard(split, k, lay, want)
        if not self.attrs.get("complete"):
            problems.append(f"{self.url}: store is not marked complete (encode unfinished or not finalized)")
        return problems

    def _verify_shard(self, split: str, k: int, lay: SplitLayout, want: list[str]) -> list[str]:
        where = f"{split} shard {k}"
        try:
            c = self.read_commit(split, k)
        except StoreError as e:
            return [str(e)]
        lo, hi = lay.shard_range(k)
        problems = []
        if (c.start, c.stop) != (lo, hi):
            problems.append(f"{where}: marker covers clips [{c.start}, {c.stop}), layout says [{lo}, {hi})")
        if c.keys != want[lo:hi]:
            problems.append(f"{where}: clips recorded in the marker differ from the manifest's clips {lo}..{hi - 1}")
        skipped = {s["index"] for s in c.skipped}
        for name, digest in c.checksums.items():
            path = f"{self.root}/{self._shard_key(split, name, k)}"
            try:
                data = self.fs.cat_file(path)
            except FileNotFoundError:
                problems.append(f"{where}: shard file {path} is missing")
                continue
            if _sha256(data) != digest:
                problems.append(f"{where}: checksum mismatch in {path} ({len(data)} bytes): "
                                f"the file was changed or truncated")
        if problems:
            return problems
        lengths = self.array(split, "length")[lo:hi]
        if lengths.tolist() != c.lengths:
            problems.append(f"{where}: length array {lengths.tolist()} differs from marker {c.lengths}")
        mean = self.array(split, "mean")[lo:hi]
        actions = self.array(split, "actions")[lo:hi]
        for i, n in enumerate(c.lengths):
            idx = lo + i
            if n == 0 and idx not in skipped:
                problems.append(f"{where}: clip {idx} ({c.keys[i]}) has no frames and is not recorded as skipped")
            if n > lay.frames:
                problems.append(f"{where}: clip {idx} length {n} > {lay.frames} frames")
                continue
            if not np.isfinite(mean[i, :n]).all():
                problems.append(f"{where}: clip {idx} ({c.keys[i]}) has non-finite latents inside its {n} frames")
            if not np.isnan(mean[i, n:]).all():
                problems.append(f"{where}: clip {idx} ({c.keys[i]}) padding past frame {n} is not NaN")
            if (actions[i, n:] != -1).any():
                problems.append(f"{where}: clip {idx} ({c.keys[i]}) actions past frame {n} are not -1")
        return problems

    # ---------------------------------------------------------------- info
    def info(self) -> dict:
        """Summary for `minisora store info` (sizes computed from the files on disk)."""
        out = {"url": self.url, "schema_version": self.attrs.get("schema_version"),
               "complete": bool(self.attrs.get("complete")), "vae": self.attrs.get("vae"),
               "source": self.attrs.get("source"), "latent_stats": self.attrs.get("latent_stats"),
               "skipped": self.attrs.get("skipped", []), "manifest_skipped": self.attrs.get("manifest_skipped", []),
               "chunk_checksum": self.attrs.get("chunk_checksum"), "splits": {}}
        total_bytes = 0
        for split in self.splits:
            lay = self.layout(split)
            nbytes = sum(self.fs.du(f"{self.root}/{split}/{n}", total=True) for n in self.array_names())
            total_bytes += nbytes
            lengths = self.array(split, "length")[:]
            frames = int(lengths.sum())
            committed = lay.num_shards - len(self.pending_shards(split))
            out["splits"][split] = {"clips": lay.clips, "latent_frames": frames, "max_frames": lay.frames,
                                    "latent_shape": [lay.channels, lay.height, lay.width], "shards": lay.num_shards,
                                    "committed_shards": committed, "clips_per_shard": lay.clips_per_shard,
                                    "bytes": nbytes, "bytes_per_frame": nbytes / max(frames, 1)}
        src = self.attrs.get("source", {})
        h, w = src.get("resolution", [0, 0])
        tc = (self.attrs.get("vae") or {}).get("temporal_compression", 1)
        out["bytes"] = total_bytes
        out["raw_pixel_bytes_per_latent_frame"] = h * w * 3 * tc
        return out

    # ---------------------------------------------------------------- verified reads (training)
    def read_shard(self, split: str, k: int, names: tuple[str, ...] | list[str],
                   lengths: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], int]:
        """Shard k of the arrays `names`, checked against its commit marker before use.

        Each shard file is read once as raw bytes (the files in parallel threads), hashed, compared
        with the marker's sha256 and decoded by zarr from memory, so the check adds no I/O. A shard
        without a readable marker, with a missing or changed file, or whose marker disagrees with
        `lengths` (the split's length array at [start, stop)) raises StoreError. Returns
        ({name: (n, ...) array}, bytes read).
        """
        hint = f"; run `minisora store verify {self.url}` to check the whole store, then re-encode it"
        marker = self._marker_path(split, k)
        try:
            raw_marker = self.fs.cat_file(marker)
        except FileNotFoundError:
            raise StoreError(f"{self.url}: {split} shard {k} has no commit marker ({marker}); it is never "
                             f"read for training{hint}") from None
        try:
            commit = ShardCommit(**json.loads(raw_marker))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
            raise StoreError(f"{self.url}: {split} shard {k}: commit marker {marker} is unreadable ({e}){hint}") from e
        lo, hi = self.layout(split).shard_range(k)
        wrong_lengths = lengths is not None and [int(x) for x in lengths] != commit.lengths
        if (commit.start, commit.stop) != (lo, hi) or wrong_lengths:
            raise StoreError(f"{self.url}: {split} shard {k}: commit marker {marker} does not describe clips "
                             f"[{lo}, {hi}) with the stored lengths{hint}")
        with ThreadPoolExecutor(max_workers=len(names)) as pool:  # the files in parallel: latency once per shard
            files = dict(zip(names, pool.map(lambda n: self._read_shard_file(split, k, n, commit, hint), names)))
        return {n: arr for n, (arr, _) in files.items()}, len(raw_marker) + sum(b for _, b in files.values())

    def _read_shard_file(self, split: str, k: int, name: str, commit: ShardCommit, hint: str) -> tuple[np.ndarray, int]:
        path = f"{self.root}/{self._shard_key(split, name, k)}"
        try:
            raw = self.fs.cat_file(path)
        except FileNotFoundError:
            raise StoreError(f"{self.url}: {split} shard {k}: shard file {path} is missing{hint}") from None
        if name not in commit.checksums or _sha256(raw) != commit.checksums[name]:
            raise StoreError(f"{self.url}: {split} shard {k}: checksum mismatch in {path} ({len(raw)} bytes), "
                             f"the file was changed or truncated{hint}")
        try:
            return self._decode_shard(split, name, k, raw), len(raw)
        except Exception as e:  # the bytes match the marker, so the marker was written from bad bytes
            raise StoreError(f"{self.url}: {split} shard {k}: cannot decode {path} ({e}){hint}") from e

    def _decode_shard(self, split: str, name: str, k: int, raw: bytes) -> np.ndarray:
        """Decode one shard file's bytes with the array's own metadata (codecs, chunking) from memory."""
        from zarr.core.buffer import default_buffer_prototype
        from zarr.storage import MemoryStore

        meta = self._array_meta.get((split, name))
        if meta is None:
            meta = self._array_meta[(split, name)] = self.fs.cat_file(f"{self.root}/{split}/{name}/zarr.json")
        key = self._shard_key(split, name, k).removeprefix(f"{split}/{name}/")
        buf = default_buffer_prototype().buffer.from_bytes
        arr = zarr.open_array(MemoryStore({"zarr.json": buf(meta), key: buf(raw)}), mode="r")
        lo, hi = self.layout(split).shard_range(k)
        return arr[lo:hi]
