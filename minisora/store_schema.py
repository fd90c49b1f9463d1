"""The latent store's building blocks: its error, split geometry, commit markers and checked casts.

`minisora/store.py` documents the layout and holds `LatentStore`, which uses these; they live here so
that the store, its guard (`store_guard.py`) and the encoder share them without importing each other.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field

import fsspec
import numpy as np

from minisora.errors import MinisoraError

SCHEMA_VERSION = 1
ARRAYS_5D = ("mean", "logvar")


class StoreError(MinisoraError, RuntimeError):
    """A store that is missing, incomplete, inconsistent or made with other settings."""


@dataclass
class SplitLayout:
    """Geometry of one split: N clips of up to T latent frames of (C, h, w)."""

    clips: int
    frames: int
    channels: int
    height: int
    width: int
    clips_per_shard: int

    @property
    def num_shards(self) -> int:
        return math.ceil(self.clips / self.clips_per_shard)

    def shard_range(self, k: int) -> tuple[int, int]:
        lo = k * self.clips_per_shard
        return lo, min(lo + self.clips_per_shard, self.clips)


def clips_per_shard_for(frames: int, channels: int, height: int, width: int, target_mb: float = 32.0) -> int:
    """Clips per shard so that one mean shard file is about `target_mb` MB (fp16)."""
    clip_bytes = frames * channels * height * width * 2
    return max(1, int(target_mb * 1e6 // max(clip_bytes, 1)))


def narrow(values: np.ndarray, dtype, what: str) -> np.ndarray:
    """`values` cast to the narrower `dtype`, refusing any value the cast would not keep.

    Integers must fit (no wrap-around: 10**6 would become 16960 in int16); finite floats must stay
    finite (float16 overflows to inf past 65504). NaN stays NaN (the store's padding).
    """
    values = np.asarray(values)
    dtype = np.dtype(dtype)
    if values.size and np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        lo, hi = values.min(), values.max()
        if lo < info.min or hi > info.max:
            raise StoreError(f"{what}: values in [{lo}, {hi}] do not fit {dtype} [{info.min}, {info.max}]")
    elif values.size and np.issubdtype(dtype, np.floating) and np.issubdtype(values.dtype, np.floating):
        finite = np.isfinite(values)
        big = np.abs(np.where(finite, values, 0)).max()
        if big > np.finfo(dtype).max:
            top = float(np.finfo(dtype).max)
            raise StoreError(f"{what}: |value| {float(big):.6g} overflows {dtype} (max {top:.6g}); "
                             "the VAE's latents are out of range (check its dtype and inputs)")
    return values.astype(dtype)


def _fs_and_root(url: str) -> tuple[fsspec.AbstractFileSystem, str, bool]:
    """fsspec filesystem and root path of a store URL; local paths and file:// are local."""
    if "://" not in url or url.startswith("file://"):
        path = os.path.abspath(url.removeprefix("file://"))
        return fsspec.filesystem("file"), path, True
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/"), False


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class ShardCommit:
    """What a commit marker records about one shard (JSON)."""

    split: str
    shard: int
    start: int
    stop: int
    keys: list[str]
    lengths: list[int]
    skipped: list[dict] = field(default_factory=list)  # {"index", "path", "reason"}
    checksums: dict[str, str] = field(default_factory=dict)  # array name -> sha256 of its shard file
    sums: dict[str, list] = field(default_factory=dict)  # "stats": per-channel [count, sum, sum of E[z^2]]
    action_max: int = -1  # largest action id in the shard (-1: none)


def channel_sums(mean: np.ndarray, logvar: np.ndarray | None, lengths: np.ndarray) -> dict[str, list]:
    """Per-channel count, sum and sum of E[z^2] over the valid frames of a shard (float64).

    With a posterior N(mean, exp(logvar)), E[z^2] = mean^2 + exp(logvar): the statistics describe
    the latents training actually samples, not only the means.
    """
    c = mean.shape[2]
    count, s1, s2 = np.zeros(c), np.zeros(c), np.zeros(c)
    for i, n in enumerate(lengths):
        if n == 0:
            continue
        m = mean[i, :n].astype(np.float64)  # (n, C, h, w)
        sq = m**2 + (np.exp(logvar[i, :n].astype(np.float64)) if logvar is not None else 0.0)
        count += m.shape[0] * m.shape[2] * m.shape[3]
        s1 += m.sum(axis=(0, 2, 3))
        s2 += sq.sum(axis=(0, 2, 3))
    return {"stats": [count.tolist(), s1.tolist(), s2.tolist()]}
