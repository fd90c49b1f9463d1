"""Latent windows for training: random windows of consecutive latent frames from a latent store.

Reading. The reader never pays one zarr call per window: it reads whole shards, one request per
array per shard, through `LatentStore.read_shard`, which hashes the bytes it read against the
shard's commit marker before decoding them (no extra I/O). A shard without a valid marker, or
with a changed or truncated file, is never trained on. Windows are copied out of the shards held
in RAM with one contiguous slice per window and array.

Order (`WindowSampler`). Everything is a function of (seed, epoch, rank, world, batch size,
cache_shards), so a run resumes mid-epoch from (epoch, batch index).
1. Deal: each epoch a seeded permutation of the shards that hold usable clips (clips with at
   least `frames` latent frames) is dealt to the W ranks, largest shard first to the rank with
   the fewest usable clips so far. A rank reads only its own shards: about 1/W of the store.
2. Mix: a rank keeps `cache_shards` shards open and draws each next clip uniformly among the
   clips left in its open shards; an exhausted shard is replaced by the rank's next one. A batch
   therefore mixes windows from several shards. Each clip gets one random window start.
3. Edge rule: every rank runs B = U // (W * batch) batches (U usable clips), so every rank takes
   n = B * batch clips. A rank dealt more than n clips skips the last ones of its order; a rank
   dealt fewer repeats the last ones of its order (their shards are still in RAM) with new
   window starts. Dealing largest-first keeps each rank's surplus or deficit below one shard.

Loading (`WindowLoader`). A background thread assembles batches in order; a pool of
`readahead` threads reads the rank's next shards before the current ones run out, so training
does not wait for a shard read. A shard stays in RAM from its first to its last batch.

Windows are returned as fp16 posterior mean/log-variance; `sample_latents` draws the posterior
sample (mean + std * noise) and normalises with the store's per-channel statistics. It runs on
the training device, so a fresh sample per read costs no host time.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter, OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

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
        self.names = ("mean", "actions") + (() if self.deterministic else ("logvar",))
        stats = self.store.attrs["latent_stats"]
        self.stats_mean = torch.tensor(stats["mean"], dtype=torch.float32)
        self.stats_std = torch.tensor(stats["std"], dtype=torch.float32)
        self.cache_shards = cache_shards
        self.bytes_read = 0  # bytes of shard files and markers read so far (benchmarks, tests)
        self.shard_reads: Counter[int] = Counter()  # shard -> times read
        self.shard_nbytes: dict[int, int] = {}  # shard -> bytes its last read fetched
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()  # LRU of read()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ shards
    def shard_of(self, clip: np.ndarray) -> np.ndarray:
        return clip // self.layout.clips_per_shard

    def load_shard(self, k: int) -> dict[str, np.ndarray]:
        """Shard k's arrays, read once and checked against its commit marker (StoreError if not)."""
        lo, hi = self.layout.shard_range(k)
        data, nbytes = self.store.read_shard(self.split, k, self.names, lengths=self.lengths[lo:hi])
        with self._lock:
            self.bytes_read += nbytes
            self.shard_reads[k] += 1
            self.shard_nbytes[k] = nbytes
        return data

    def _cached(self, k: int) -> dict[str, np.ndarray]:
        with self._lock:
            if k in self._cache:
                self._cache.move_to_end(k)
                return self._cache[k]
        data = self.load_shard(k)
        with self._lock:
            self._cache[k] = data
            while len(self._cache) > self.cache_shards:
                self._cache.popitem(last=False)
        return data

    # ------------------------------------------------------------------ windows
    def read(self, clips: np.ndarray, starts: np.ndarray) -> LatentBatch:
        """Gather windows [start, start + frames) of the given clips (any order, any shards)."""
        clips = np.asarray(clips, np.int64)
        data = {int(k): self._cached(int(k)) for k in np.unique(self.shard_of(clips))}
        return self.gather(data, clips, starts)

    def gather(self, shards: dict[int, dict[str, np.ndarray]], clips: np.ndarray, starts: np.ndarray,
               pin_memory: bool = False) -> LatentBatch:
        """Copy the windows out of shards already in RAM, into pinned tensors when asked."""
        clips, starts = np.asarray(clips, np.int64), np.asarray(starts, np.int64)
        bad = np.flatnonzero((starts < 0) | (starts + self.frames > self.lengths[clips]))
        if len(bad):
            j = int(bad[0])
            raise IndexError(f"window [{starts[j]}, {starts[j] + self.frames}) of clip {clips[j]} "
                             f"leaves its {self.lengths[clips[j]]} latent frames")
        ks = self.shard_of(clips)
        rows = clips - ks * self.layout.clips_per_shard
        first = shards[int(ks[0])]
        dtype = lambda name, arr: torch.int64 if name == "actions" else torch.from_numpy(arr[:0]).dtype  # noqa: E731
        out = {name: torch.empty((len(clips), self.frames) + arr.shape[2:], dtype=dtype(name, arr),
                                 pin_memory=pin_memory) for name, arr in first.items()}
        views = {name: t.numpy() for name, t in out.items()}
        for j, (k, r, t0) in enumerate(zip(ks.tolist(), rows.tolist(), starts.tolist())):
            for name, arr in shards[k].items():  # a contiguous slice copy per window and array
                views[name][j] = arr[r, t0:t0 + self.frames]
        return LatentBatch(mean=out["mean"], logvar=out.get("logvar"), actions=out["actions"],
                           clip=torch.from_numpy(clips), start=torch.from_numpy(starts))


@dataclass
class RankEpoch:
    """One rank's epoch: n = batches x batch_size items, and what the edge rule changed."""

    clips: np.ndarray  # (n,) clip indices in delivery order
    starts: np.ndarray  # (n,) first latent frame of each window
    shards: np.ndarray  # the shards dealt to this rank: the first `mix` open at once, the rest in this order
    dropped: np.ndarray  # clips dealt to this rank but skipped (surplus over n)
    repeated: np.ndarray  # clips delivered twice (deficit under n)


class WindowSampler:
    """Deterministic, rank-aware, resumable order of (clip, start) windows (module docstring)."""

    def __init__(self, windows: LatentWindows, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1):
        self.w, self.batch_size, self.seed, self.rank, self.world = windows, batch_size, seed, rank, world
        self.mix = max(1, windows.cache_shards)
        self._plans: dict[tuple[int, int], RankEpoch] = {}  # (epoch, rank) -> plan, the last two computed
        shards = windows.shard_of(windows.usable)
        self.usable_per_shard = np.bincount(shards, minlength=windows.layout.num_shards)
        self.live_shards = np.flatnonzero(self.usable_per_shard)  # shards holding at least one usable clip
        if len(self.live_shards) < world:
            raise ValueError(f"{windows.store.url}: {len(self.live_shards)} shards of {windows.split} hold clips of "
                             f">= {windows.frames} latent frames, fewer than the {world} ranks; each rank reads "
                             "whole shards of its own: re-encode with a smaller --clips-per-shard or use fewer ranks")
        if self.batches_per_epoch() == 0:
            raise ValueError(f"{len(windows.usable)} usable clips are fewer than one global batch "
                             f"({world} ranks x {batch_size}); lower --batch-size")

    def batches_per_epoch(self) -> int:
        return len(self.w.usable) // (self.world * self.batch_size)

    def deal(self, epoch: int) -> list[np.ndarray]:
        """The shards of every rank this epoch (the same on every rank), each in a random opening order."""
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(self.live_shards)
        sizes = self.usable_per_shard[perm]
        load, owner = np.zeros(self.world, np.int64), np.empty(len(perm), np.int64)
        for i in np.argsort(-sizes, kind="stable"):  # largest first, ties in the permuted order
            owner[i] = int(np.argmin(load))  # the least-loaded rank (lowest index on ties)
            load[owner[i]] += sizes[i]
        return [perm[owner == r] for r in range(self.world)]

    def rank_epoch(self, epoch: int, rank: int | None = None) -> RankEpoch:
        """A rank's clips and window starts for one epoch: dealt, mixed, cut or extended to n (the edge rule)."""
        rank = self.rank if rank is None else rank
        if (epoch, rank) in self._plans:
            return self._plans[(epoch, rank)]
        shards = self.deal(epoch)[rank]
        rng = np.random.default_rng([self.seed, epoch, 1 + rank])
        cps, usable = self.w.layout.clips_per_shard, self.w.usable
        queues = [rng.permutation(usable[(usable >= k * cps) & (usable < (k + 1) * cps)]) for k in shards]
        order = self._mix(queues, rng)
        n = self.batches_per_epoch() * self.batch_size
        dropped, repeated = order[n:], order[:0]
        if len(order) >= n:
            order = order[:n]
        else:  # the last items again, cycling backwards if a rank holds fewer than half of n
            repeated = order[(len(order) - (n - len(order)) + np.arange(n - len(order))) % len(order)]
            order = np.concatenate([order, repeated])
        starts = rng.integers(0, self.w.lengths[order] - self.w.frames + 1)  # inclusive of the last valid start
        plan = RankEpoch(order, starts, shards, dropped, repeated)
        self._plans = {**dict(list(self._plans.items())[-1:]), (epoch, rank): plan}  # the last two plans
        return plan

    def _mix(self, queues: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
        """Interleave the shards' clip queues through a window of `mix` open shards."""
        total = sum(len(q) for q in queues)
        out, opened = np.empty(total, np.int64), min(self.mix, len(queues))
        open_q, pos = list(range(opened)), [0] * opened
        draws = rng.random(total)
        for i in range(total):
            left = np.array([len(queues[q]) - p for q, p in zip(open_q, pos)])
            j = int(np.searchsorted(np.cumsum(left), draws[i] * left.sum(), side="right"))
            j = min(j, len(left) - 1)
            out[i] = queues[open_q[j]][pos[j]]
            pos[j] += 1
            if pos[j] == len(queues[open_q[j]]):  # exhausted: open the rank's next shard in its place
                if opened < len(queues):
                    open_q[j], pos[j], opened = opened, 0, opened + 1
                else:
                    del open_q[j], pos[j]
        return out

    def epoch_items(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's (clips, starts) for one epoch, in delivery order."""
        e = self.rank_epoch(epoch)
        return e.clips, e.starts

    def batches(self, epoch: int, start_batch: int = 0):
        """Yield (batch index, clips, starts) of this rank for one epoch, from `start_batch` on."""
        clips, starts = self.epoch_items(epoch)
        for i in range(start_batch, self.batches_per_epoch()):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            yield i, clips[sl], starts[sl]


class ShardUse(NamedTuple):
    """One stretch of a rank's batches that needs one shard: batches `first` to `last` of `epoch` (inclusive)."""

    epoch: int
    shard: int
    first: int
    last: int

    def starts_after(self, epoch: int, batch: int) -> bool:
        return (self.epoch, self.first) > (epoch, batch)

    def ends_at(self, epoch: int, batch: int) -> bool:
        return (self.epoch, self.last) == (epoch, batch)


@dataclass
class ResidentShard:
    """A shard the loader holds: its read (in the read-ahead pool), and how many acquired uses still need it."""

    read: Future
    uses: int = 0


class EpochItems(NamedTuple):
    """A rank's (clips, starts) of one epoch, in delivery order."""

    epoch: int
    clips: np.ndarray
    starts: np.ndarray


class Delivery(NamedTuple):
    """What the loader's thread queues for the training loop: batch `batch` of `epoch`."""

    epoch: int
    batch: int
    windows: LatentBatch


class WindowLoader:
    """Endless iterator of LatentBatch, assembled in a background thread with shard read-ahead; resumable.

    state_dict() -> {"epoch", "batch", "cache_shards"}: the next batch to deliver and the mixing
    width the order depends on. Pass it back to resume exactly.
    """

    def __init__(self, sampler: WindowSampler, state: dict | None = None, prefetch: int = 4,
                 readahead: int = 3, pin_memory: bool = False):
        state = state or {}
        if state.get("cache_shards", sampler.mix) != sampler.mix:
            raise ValueError(f"the run being resumed mixed {state['cache_shards']} open shards per rank; this run has "
                             f"--cache-shards {sampler.mix}, which would change the data order: resume with "
                             f"--cache-shards {state['cache_shards']}")
        self.sampler, self.readahead, self.pin_memory = sampler, max(1, readahead), pin_memory
        self.epoch, self.batch = int(state.get("epoch", 0)), int(state.get("batch", 0))
        self.peak_resident = 0  # most shards held in RAM at once (benchmarks)
        self.epoch_reads: dict[int, list[int]] = {}  # shards read for each epoch's batches (recent epochs)
        self._items_cache: EpochItems | None = None
        self._q: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=self.readahead, thread_name_prefix="shard-read")
        self._thread = threading.Thread(target=self._run, args=(self.epoch, self.batch), daemon=True)
        self._thread.start()

    def _shard_uses(self, epoch: int, batch: int):
        """Every ShardUse from (epoch, batch) on, in first-use order, forever."""
        bs = self.sampler.batch_size
        while True:
            clips = self.sampler.rank_epoch(epoch).clips[batch * bs:]
            ks = self.sampler.w.shard_of(clips)
            uniq, first = np.unique(ks, return_index=True)
            _, last_rev = np.unique(ks[::-1], return_index=True)
            last = len(ks) - 1 - last_rev
            for i in np.argsort(first):
                yield ShardUse(epoch, int(uniq[i]), batch + int(first[i]) // bs, batch + int(last[i]) // bs)
            epoch, batch = epoch + 1, 0

    def _run(self, epoch: int, batch: int) -> None:
        resident: dict[int, ResidentShard] = {}  # shard -> its read and its unfinished uses
        pending: list[ShardUse] = []  # acquired uses, not yet finished
        uses = self._shard_uses(epoch, batch)
        upcoming = next(uses)
        try:
            while not self._stop.is_set():
                # acquire every shard use starting by this batch, plus `readahead` more (read in the pool)
                ahead = sum(u.starts_after(epoch, batch) for u in pending)
                while not upcoming.starts_after(epoch, batch) or ahead < self.readahead:
                    if upcoming.starts_after(epoch, batch):
                        ahead += 1
                    if upcoming.shard not in resident:
                        resident[upcoming.shard] = ResidentShard(self._pool.submit(self.sampler.w.load_shard,
                                                                                   upcoming.shard))
                        self.epoch_reads.setdefault(upcoming.epoch, []).append(upcoming.shard)
                    resident[upcoming.shard].uses += 1
                    pending.append(upcoming)
                    upcoming = next(uses)
                self.peak_resident = max(self.peak_resident, len(resident))
                clips, starts = self._batch_items(epoch, batch)
                need = np.unique(self.sampler.w.shard_of(clips)).tolist()
                shards = {k: resident[k].read.result() for k in need}
                self._put(Delivery(epoch, batch, self.sampler.w.gather(shards, clips, starts, self.pin_memory)))
                for use in [u for u in pending if u.ends_at(epoch, batch)]:  # shards done with
                    pending.remove(use)
                    resident[use.shard].uses -= 1
                    if resident[use.shard].uses == 0:
                        del resident[use.shard]
                epoch, batch = (epoch, batch + 1) if batch + 1 < self.sampler.batches_per_epoch() else (epoch + 1, 0)
        except BaseException as e:  # surface reader errors in the training loop
            self._put(e)

    def _put(self, item) -> None:
        """Queue `item` for the training loop, waiting while the queue is full, unless the loader is stopped."""
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _batch_items(self, epoch: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._items_cache is None or self._items_cache.epoch != epoch:
            self._items_cache = EpochItems(epoch, *self.sampler.epoch_items(epoch))
        sl = slice(batch * self.sampler.batch_size, (batch + 1) * self.sampler.batch_size)
        return self._items_cache.clips[sl], self._items_cache.starts[sl]

    def __iter__(self):
        return self

    def __next__(self) -> LatentBatch:
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        n = self.sampler.batches_per_epoch()
        self.epoch, self.batch = (item.epoch, item.batch + 1) if item.batch + 1 < n else (item.epoch + 1, 0)
        for e in [e for e in list(self.epoch_reads) if e < self.epoch - 2]:
            self.epoch_reads.pop(e, None)
        return item.windows

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "cache_shards": self.sampler.mix}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)  # reads in flight finish (no half-done zarr tasks)
