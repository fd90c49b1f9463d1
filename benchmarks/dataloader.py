"""The data path at cluster scale: W ranks simulated in one process on a real store (sampler + loader, no model).

    python benchmarks/dataloader.py --world 1,8,64 [--clips 2000] [--store-dir DIR]

Two synthetic stores are written straight with `LatentStore.write_shard` (random latents, no VAE):
- scaling: `--clips` clips of 300 latent frames of 4 x 8 x 8 (an 8x VAE on 64x64 DMLab),
  `--clips-per-shard` clips per shard. For each W the W ranks run one epoch one after the other,
  each with its own reader, as W processes would. Per rank and epoch: bytes of shard files and
  commit markers read, as a fraction of the split's shard files; distinct shards per batch;
  windows/s over the whole epoch, start-up (store opened to first batch) included.
- shard-sized: 8 shards of 52 clips of 300 frames of 4 x 16 x 16 (a 4x VAE), about 32 MB per
  mean shard file, the default geometry of `minisora encode` for DMLab. One rank reads it with 2
  open shards, so most shard reads happen while batches are delivered and must come ahead of
  them: with the sha256 check, without it (zarr reads the shard directly), and through a wrapper
  filesystem that sleeps 50 ms in every read call, to show that read-ahead hides latency.
  Windows/s and the process's CPU time per shard read count the `--epochs` epochs after the first
  (steady state); start-up is its own column.

The last line is `each rank reads X of the store at W=64`, X the largest fraction over the ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from minisora.dataset import LatentWindows, WindowLoader, WindowSampler
from minisora.store import LatentStore, SplitLayout


class SlowFileSystem(LocalFileSystem):
    """The local filesystem with `latency` seconds added to every read call (`slow://` URLs)."""

    protocol = ("slow",)
    latency = 0.05

    def cat_file(self, path, start=None, end=None, **kw):
        time.sleep(self.latency)
        return super().cat_file(path, start=start, end=end, **kw)

    def info(self, path, **kw):
        time.sleep(self.latency)
        return super().info(path, **kw)

    def exists(self, path, **kw):
        time.sleep(self.latency)
        return super().exists(path, **kw)


fsspec.register_implementation("slow", SlowFileSystem, clobber=True)


class UncheckedWindows(LatentWindows):
    """The reader without the commit-marker check: zarr reads each shard itself (for comparison only)."""

    def load_shard(self, k: int) -> dict[str, np.ndarray]:
        lo, hi = self.layout.shard_range(k)
        data = {n: self.store.array(self.split, n)[lo:hi] for n in self.names}
        st = self.store
        nbytes = sum(st.fs.size(f"{st.root}/{st._shard_key(self.split, n, k)}") for n in self.names)
        with self._lock:
            self.shard_reads[k] += 1
            self.bytes_read += nbytes
            self.shard_nbytes[k] = nbytes
        return data


def build(path: Path, clips: int, per_shard: int, shape: tuple[int, int, int], frames: int = 300) -> LatentStore:
    """A complete store of random latents (deterministic), reused when `path` already holds one."""
    if (path / "zarr.json").exists() and LatentStore(str(path)).attrs.get("complete"):
        return LatentStore(str(path))
    lay = SplitLayout(clips, frames, *shape, per_shard)
    paths = [{"split": "train", "path": f"train/{i}.npz"} for i in range(clips)]
    manifest = json.dumps({"kind": "dmlab", "clips": paths})
    store = LatentStore.create(str(path), {"vae": {}, "source": {}}, {"train": lay}, False, manifest)
    for k in range(lay.num_shards):
        lo, hi = lay.shard_range(k)
        rng = np.random.default_rng(k)
        mean = rng.normal(size=(hi - lo, frames) + shape).astype(np.float16)
        logvar = (rng.normal(size=(hi - lo, frames) + shape) - 3).astype(np.float16)
        actions = rng.integers(0, 4, (hi - lo, frames)).astype(np.int16)
        store.write_shard("train", k, mean, logvar, actions, np.full(hi - lo, frames),
                          [f"train/{i}.npz" for i in range(lo, hi)], [])
    store.finalize()
    return store


def shard_file_bytes(store: LatentStore, names=("mean", "logvar", "actions")) -> int:
    return sum(store.fs.du(f"{store.root}/train/{n}/c", total=True) for n in names)


def run_rank(url: str, rank: int, world: int, args, windows_cls=LatentWindows, epochs: int = 1) -> dict:
    """One rank from its start. Epoch 0 gives the bytes: those of the shard reads made for epoch 0's
    batches (reads ahead into epoch 1 belong to epoch 1). With epochs > 1, the later epochs give the
    steady windows/s and the CPU time per shard read, once start-up is over."""
    t0 = time.perf_counter()
    w = windows_cls(url, "train", args.frames, cache_shards=args.cache_shards)  # opens the store, reads lengths
    t_open = time.perf_counter()
    sampler = WindowSampler(w, args.batch, seed=0, rank=rank, world=world)
    sampler.rank_epoch(0)  # the plan, timed alone
    t_plan = time.perf_counter()
    loader = WindowLoader(sampler, readahead=args.readahead)
    n = sampler.batches_per_epoch()
    per_batch = [len(np.unique(w.shard_of(next(loader).clip.numpy())))]
    t_first = time.perf_counter()
    per_batch += [len(np.unique(w.shard_of(next(loader).clip.numpy()))) for _ in range(n - 1)]
    t_end, c_end, reads_end = time.perf_counter(), time.process_time(), sum(w.shard_reads.values())
    reads = list(loader.epoch_reads[0])
    for _ in range((epochs - 1) * n):
        next(loader)
    t_last, c_last, reads_last = time.perf_counter(), time.process_time(), sum(w.shard_reads.values())
    loader.close()
    out = {"bytes": sum(w.shard_nbytes[k] for k in reads), "windows": n * args.batch,
           "shards_per_batch": float(np.mean(per_batch)), "rate": n * args.batch / (t_end - t0),
           "startup": t_first - t0, "open": t_open - t0, "plan": t_plan - t_open,
           "resident": loader.peak_resident, "shard_bytes": w.shard_nbytes[reads[0]],
           "ram": loader.peak_resident * decoded_shard_bytes(w)}
    if epochs > 1:
        out["steady"] = (epochs - 1) * n * args.batch / (t_last - t_end)
        out["cpu_per_shard"] = (c_last - c_end) / max(reads_last - reads_end, 1)  # all threads of the process
    return out


def decoded_shard_bytes(w: LatentWindows) -> int:
    """RAM one full shard takes once decoded: fp16 mean (+ logvar) and int16 actions."""
    lay = w.layout
    per_clip = lay.frames * (lay.channels * lay.height * lay.width * 2 * (len(w.names) - 1) + 2)
    return lay.clips_per_shard * per_clip


def scaling(store: LatentStore, worlds: list[int], args) -> dict[int, float]:
    total = shard_file_bytes(store)
    lay = store.layout("train")
    print(f"\nscaling store: {lay.clips} clips x {lay.frames} frames of {lay.channels}x{lay.height}x{lay.width}, "
          f"{lay.num_shards} shards of {lay.clips_per_shard} clips, {total / 1e6:,.0f} MB of shard files; "
          f"batch {args.batch}, --cache-shards {args.cache_shards}, read-ahead {args.readahead}")
    print(f"{'W':>4}{'read/rank (mean)':>18}{'x W':>7}{'read/rank (max)':>17}{'x W':>7}{'shards/batch':>14}"
          f"{'windows/s/rank':>16}{'start-up s':>12}{'open s':>8}{'plan s':>8}{'shards in RAM':>15}{'RAM MB':>8}")
    worst = {}
    for world in worlds:
        ranks = [run_rank(store.url, r, world, args) for r in range(world)]
        frac = np.array([r["bytes"] / total for r in ranks])
        worst[world] = float(frac.max())
        print(f"{world:>4}{frac.mean():>18.5f}{frac.mean() * world:>7.3f}{frac.max():>17.5f}{frac.max() * world:>7.3f}"
              f"{np.mean([r['shards_per_batch'] for r in ranks]):>14.2f}{np.mean([r['rate'] for r in ranks]):>16,.0f}"
              f"{np.mean([r['startup'] for r in ranks]):>12.3f}{np.mean([r['open'] for r in ranks]):>8.3f}"
              f"{np.mean([r['plan'] for r in ranks]):>8.3f}{max(r['resident'] for r in ranks):>15}"
              f"{max(r['ram'] for r in ranks) / 1e6:>8.0f}")
    return worst


def latency_and_check(store: LatentStore, args) -> None:
    lay = store.layout("train")
    args = argparse.Namespace(**{**vars(args), "cache_shards": args.stream_cache_shards})
    slow = f"slow://{store.root}"
    rows = [("sha256 check (default), local disk", store.url, LatentWindows),
            ("no check (zarr reads the shard), local disk", store.url, UncheckedWindows),
            (f"sha256 check, {SlowFileSystem.latency * 1e3:.0f} ms per read call", slow, LatentWindows)]
    print(f"\nshard-sized store: {lay.clips} clips in {lay.num_shards} shards of {lay.clips_per_shard} clips "
          f"({lay.channels}x{lay.height}x{lay.width} x {lay.frames} frames); one rank, batch {args.batch}, "
          f"--cache-shards {args.cache_shards}, read-ahead {args.readahead}, best of {args.repeats}, rows interleaved")
    print(f"{'reader':<48}{'windows/s':>11}{'vs default':>12}{'CPU ms/shard':>14}{'start-up s':>12}"
          f"{'shards in RAM':>15}{'RAM MB':>8}{'MB read/shard':>15}")
    runs = {name: [] for name, _, _ in rows}
    for _ in range(args.repeats):  # rows interleaved, so that load from other processes hits them alike
        for name, url, cls in rows:
            runs[name].append(run_rank(url, 0, 1, args, cls, epochs=1 + args.epochs))
    ref = max(r["steady"] for r in runs[rows[0][0]])
    for name, _, _ in rows:
        best = max(runs[name], key=lambda r: r["steady"])
        cpu = np.median([r["cpu_per_shard"] for r in runs[name]]) * 1e3
        print(f"{name:<48}{best['steady']:>11,.0f}{best['steady'] / ref:>11.3f}x{cpu:>14.0f}{best['startup']:>12.3f}"
              f"{best['resident']:>15}{best['ram'] / 1e6:>8.0f}{best['shard_bytes'] / 1e6:>15.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default="1,8,64", help="comma-separated numbers of simulated ranks")
    ap.add_argument("--clips", type=int, default=2000, help="clips of the scaling store")
    ap.add_argument("--clips-per-shard", type=int, default=4, help="clips per shard of the scaling store")
    ap.add_argument("--frames", type=int, default=20, help="latent frames per window")
    ap.add_argument("--batch", type=int, default=8, help="windows per rank per batch")
    ap.add_argument("--cache-shards", type=int, default=8, help="open shards each rank mixes windows from")
    ap.add_argument("--readahead", type=int, default=3, help="shards each rank reads ahead, in parallel threads")
    ap.add_argument("--stream-cache-shards", type=int, default=2,
                    help="--cache-shards of the shard-sized table: fewer open shards than the 8 shards, so that the "
                         "epoch streams through shards and each read must come ahead of its batch")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the shard-sized table measured after the first")
    ap.add_argument("--repeats", type=int, default=3, help="runs per row of the shard-sized table (best kept)")
    ap.add_argument("--store-dir", default="/tmp/minisora-bench-stores",
                    help="where the synthetic stores are written, and reused by later runs")
    ap.add_argument("--tables", default="scaling,shard", help="which tables: scaling, shard (the shard-sized store)")
    args = ap.parse_args()
    worlds, tables = [int(x) for x in args.world.split(",")], args.tables.split(",")
    root = Path(args.store_dir)
    root.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    big = build(root / f"scaling-{args.clips}-{args.clips_per_shard}", args.clips, args.clips_per_shard, (4, 8, 8))
    shardy = build(root / "shard-sized", 8 * 52, 52, (4, 16, 16)) if "shard" in tables else None
    print(f"stores ready in {time.perf_counter() - t:.1f} s under {root} (written directly, no VAE)")
    worst = scaling(big, worlds, args) if "scaling" in tables else None
    if shardy is not None:
        latency_and_check(shardy, args)
    print(f"\npeak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:,.0f} MB; "
          f"{os.cpu_count()} CPUs")
    if worst:
        w = max(worlds)
        print(f"each rank reads {worst[w]:.5f} of the store at W={w} ({worst[w] * w:.3f}/{w})")


if __name__ == "__main__":
    main()
