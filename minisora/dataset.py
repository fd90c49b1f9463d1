"""Latent windows for training: random windows of consecutive latent frames from a latent store.

The reader never pays one zarr call per window: it reads whole shards (one call per array per
shard), keeps them in RAM (an LRU of `cache_shards` shards), and copies each window out of the
cached shard with a contiguous slice. An epoch visits every usable clip once, with a random window
start, in shard-major order (shards shuffled, clips shuffled inside each shard) so consecutive
batches come from the same shard; ranks take interleaved items of the same order. Everything is a
function of (seed, epoch), so a run resumes mid-epoch from (epoch, batch index).

Windows are returned as fp16 posterior mean/log-variance; `sample_latents` draws the posterior
sample (mean + std * noise) and normalises with the store's per-channel statistics. It runs on
the training device, so a fresh sample per read costs no host time.
"""

from __future__ import annotations

import threading
import queue
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from minisora.store import LatentStore


@dataclass
class LatentBatch:
    mean: torch.Tensor  # (B, F, C, h, w) float16
    logvar: torch.Tensor | None  # (B, F, C, h, w) float16, None for deterministic VAEs
    actions: torch.Tensor  # (B, F) int64, -1 where the clip has none
    clip: torch.Tensor  # (B,) clip index in the split
    start: torch.Tensor  # (B,) first latent frame of each window

    def to(self, device) -> "LatentBatch":
        mv = lambda x: None if x is None else x.to(device, non_blocking=True)  # noqa: E731
        return LatentBatch(mv(self.mean), mv(self.logvar), mv(self.actions), self.clip, self.start)


def sample_latents(batch: LatentBatch, stats_mean: torch.Tensor, stats_std: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh posterior sample, normalised per channel: ((mean + std * eps) - mu_c) / sigma_c, float32."""
    z = batch.mean.float()
    if batch.logvar is not None:
        eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        z = z + torch.exp(0.5 * batch.logvar.float()) * eps
    shape = (1, 1, -1, 1, 1)  # broadcast over (B, F, C, h, w)
    return (z - stats_mean.view(shape).to(z)) / stats_std.view(shape).to(z)


class LatentWindows:
    """Windows of `frames` latent frames from one split of a complete store."""

    def __init__(self, store: LatentStore | str, split: str, frames: int, cache_shards: int = 8):
        self.store = store if isinstance(store, LatentStore) else LatentStore(store)
        self.store.require_complete()
        self.split, self.frames = split, frames
        self.layout = self.store.layout(split)
        self.lengths = self.store.array(split, "length")[:].astype(np.int64)
        self.usable = np.flatnonzero(self.lengths >= frames)  # clips long enough for one window
        if len(self.usable) == 0:
            raise ValueError(f"{self.store.url}: no clip in {split} has >= {frames} latent frames "
                             f"(longest has {int(self.lengths.max(initial=0))}); lower --frames")
        self.deterministic = bool(self.store.attrs["deterministic"])
        stats = self.store.attrs["latent_stats"]
        self.stats_mean = torch.tensor(stats["mean"], dtype=torch.float32)
        self.stats_std = torch.tensor(stats["std"], dtype=torch.float32)
        self.cache_shards = cache_shards
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ shards
    def shard_of(self, clip: np.ndarray) -> np.ndarray:
        return clip // self.layout.clips_per_shard

    def _shard(self, k: int) -> dict[str, np.ndarray]:
        with self._lock:
            if k in self._cache:
                self._cache.move_to_end(k)
                return self._cache[k]
        lo, hi = self.layout.shard_range(k)
        names = ["mean", "actions"] + ([] if self.deterministic else ["logvar"])
        data = {n: self.store.array(self.split, n)[lo:hi] for n in names}  # one zarr call per array
        with self._lock:
            self._cache[k] = data
            while len(self._cache) > self.cache_shards:
                self._cache.popitem(last=False)
        return data

    # ------------------------------------------------------------------ windows
    def read(self, clips: np.ndarray, starts: np.ndarray) -> LatentBatch:
        """Gather windows [start, start + frames) of the given clips (any order, any shards)."""
        clips, starts = np.asarray(clips, np.int64), np.asarray(starts, np.int64)
        if (starts < 0).any() or (starts + self.frames > self.lengths[clips]).any():
            bad = int(np.flatnonzero((starts < 0) | (starts + self.frames > self.lengths[clips]))[0])
            raise IndexError(f"window [{starts[bad]}, {starts[bad] + self.frames}) of clip {clips[bad]} "
                             f"leaves its {self.lengths[clips[bad]]} latent frames")
        shards = self.shard_of(clips)
        data = {int(k): self._shard(int(k)) for k in np.unique(shards)}  # one zarr read per array per new shard
        rows = clips - shards * self.layout.clips_per_shard
        out = {name: np.empty((len(clips), self.frames) + arr.shape[2:], arr.dtype) for name, arr in data[int(shards[0])].items()}
        for j, (k, r, t0) in enumerate(zip(shards.tolist(), rows.tolist(), starts.tolist())):
            for name, arr in data[k].items():  # a contiguous slice copy per window and array
                out[name][j] = arr[r, t0:t0 + self.frames]
        return LatentBatch(mean=torch.from_numpy(out["mean"]),
                           logvar=torch.from_numpy(out["logvar"]) if "logvar" in out else None,
                           actions=torch.from_numpy(out["actions"].astype(np.int64)),
                           clip=torch.from_numpy(clips), start=torch.from_numpy(starts))


class WindowSampler:
    """Deterministic, rank-aware, resumable order of (clip, start) windows.

    epoch_items(epoch) is the same on every rank: every usable clip once, shards in a random order,
    clips shuffled inside each shard, one random start per clip. Rank r takes items r, r + W, ...
    (the list is cut to a multiple of W * batch_size so every rank runs the same number of steps).
    """

    def __init__(self, windows: LatentWindows, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1):
        self.w, self.batch_size, self.seed, self.rank, self.world = windows, batch_size, seed, rank, world
        if self.batches_per_epoch() == 0:
            raise ValueError(f"{len(windows.usable)} usable clips are fewer than one global batch "
                             f"({world} ranks x {batch_size}); lower --batch-size")

    def batches_per_epoch(self) -> int:
        return len(self.w.usable) // (self.world * self.batch_size)

    def epoch_items(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        clips = self.w.usable
        shards = self.w.shard_of(clips)
        shard_order = rng.permutation(np.unique(shards))
        rank_of_shard = np.empty(shards.max() + 1, np.int64)
        rank_of_shard[shard_order] = np.arange(len(shard_order))
        key = rank_of_shard[shards] * len(clips) + rng.permutation(len(clips))  # shard-major, shuffled inside
        order = clips[np.argsort(key, kind="stable")]
        starts = rng.integers(0, self.w.lengths[order] - self.w.frames + 1)  # inclusive of the last valid start
        n = self.batches_per_epoch() * self.world * self.batch_size
        return order[:n], starts[:n]

    def batches(self, epoch: int, start_batch: int = 0):
        """Yield (batch index, clips, starts) of this rank for one epoch, from `start_batch` on."""
        clips, starts = self.epoch_items(epoch)
        mine_c, mine_s = clips[self.rank::self.world], starts[self.rank::self.world]
        for i in range(start_batch, self.batches_per_epoch()):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            yield i, mine_c[sl], mine_s[sl]


class WindowLoader:
    """Endless iterator of LatentBatch with a background thread reading ahead; resumable.

    state_dict() -> {"epoch", "batch"}: the next batch to deliver. Pass it back to resume exactly.
    """

    def __init__(self, sampler: WindowSampler, state: dict | None = None, prefetch: int = 4):
        self.sampler = sampler
        self.epoch = int((state or {}).get("epoch", 0))
        self.batch = int((state or {}).get("batch", 0))
        self._q: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self.epoch, self.batch), daemon=True)
        self._thread.start()

    def _run(self, epoch: int, batch: int) -> None:
        try:
            while not self._stop.is_set():
                for i, clips, starts in self.sampler.batches(epoch, batch):
                    item = (epoch, i, self.sampler.w.read(clips, starts))
                    while not self._stop.is_set():
                        try:
                            self._q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if self._stop.is_set():
                        return
                epoch, batch = epoch + 1, 0
        except BaseException as e:  # surface reader errors in the training loop
            self._q.put(e)

    def __iter__(self):
        return self

    def __next__(self) -> LatentBatch:
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        epoch, i, batch = item
        n = self.sampler.batches_per_epoch()
        self.epoch, self.batch = (epoch, i + 1) if i + 1 < n else (epoch + 1, 0)
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
