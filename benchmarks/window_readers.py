"""Windows per second of training input, four ways, on the same DMLab-shaped data in one run.

    python benchmarks/window_readers.py [--clips 64] [--frames 20] [--batch 64] [--seconds 5]

1. minisora's reader (minisora.dataset): whole shards cached in RAM, one slice copy per window;
   also with the posterior sample + normalisation done on the CPU (on a GPU it runs on the device)
2. a plain numpy memmap of the same latents, one slice per window (the fastest thing possible)
3. naive zarr: one zarr read call per window on the same store
4. the pixel path of the original minisora: read the clip's npz, take the window, run the VAE
   on every frame, per sample (what training pays without a latent cache)

Latents are DMLab-shaped: 300 latent frames of 4 x 16 x 16 fp16 per clip (64x64 pixels, 4x VAE).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def build(tmp: Path, clips: int, frames: int = 300, shape=(4, 16, 16)):
    from minisora.store import LatentStore, SplitLayout

    rng = np.random.default_rng(0)
    mean = rng.normal(size=(clips, frames) + shape).astype(np.float16)
    logvar = (rng.normal(size=(clips, frames) + shape) - 3).astype(np.float16)
    actions = rng.integers(0, 4, (clips, frames)).astype(np.int16)
    per_shard = 16
    lay = SplitLayout(clips, frames, *shape, per_shard)
    manifest = json.dumps({"kind": "dmlab",
                           "clips": [{"split": "train", "path": f"train/{i}.npz"} for i in range(clips)]})
    store = LatentStore.create(str(tmp / "store"), {"vae": {}, "source": {}}, {"train": lay}, False, manifest)
    for k in range(lay.num_shards):
        lo, hi = lay.shard_range(k)
        store.write_shard("train", k, mean[lo:hi], logvar[lo:hi], actions[lo:hi], np.full(hi - lo, frames),
                          [f"train/{i}.npz" for i in range(lo, hi)], [])
    store.finalize()
    mm = np.lib.format.open_memmap(tmp / "mean.npy", mode="w+", dtype=np.float16, shape=mean.shape)
    mm[:] = mean
    mm.flush()
    return store


def rate(fn, seconds: float, per_call: int) -> float:
    fn()  # warm up (first shard reads, caches)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += per_call
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=64)
    ap.add_argument("--frames", type=int, default=20, help="latent frames per window")
    ap.add_argument("--batch", type=int, default=64, help="windows per batch")
    ap.add_argument("--seconds", type=float, default=5.0, help="time per method")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the pixel path's VAE")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from minisora.dataset import LatentWindows, WindowSampler, sample_latents

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        store = build(tmp, args.clips)
        rng = np.random.default_rng(1)
        F = args.frames

        def windows():
            return rng.integers(0, args.clips, args.batch), rng.integers(0, 300 - F + 1, args.batch)

        # 1. minisora reader, as the training loop uses it (sampler order, batch gather, posterior sample)
        w = LatentWindows(store, "train", F, cache_shards=64)
        sampler = WindowSampler(w, args.batch, seed=0)
        it = iter(())

        def ours(posterior: bool = False):
            nonlocal it
            try:
                _, c, s = next(it)
            except StopIteration:
                it = sampler.batches(int(rng.integers(1 << 30)))
                _, c, s = next(it)
            batch = w.read(c, s)
            if posterior:  # on a GPU this runs on the device; here it is CPU time
                sample_latents(batch, w.stats_mean, w.stats_std)

        # 2. numpy memmap, one slice per window
        mm = np.load(tmp / "mean.npy", mmap_mode="r")

        def memmap():
            c, s = windows()
            np.stack([mm[ci, si:si + F] for ci, si in zip(c, s)])

        # 3. naive zarr: one read call per window
        arr = store.array("train", "mean")

        def naive_zarr():
            c, s = windows()
            for ci, si in zip(c[:8], s[:8]):
                arr[int(ci), int(si):int(si) + F]

        # 4. pixel path: npz clip -> window -> VAE encode, per sample
        from minisora.data.synthetic import render_dmlab_clip, save_npz
        from minisora.vae import build_vae, frames_to_pixels, tiny_vae_config

        video, acts = render_dmlab_clip(0, 300)
        clip = tmp / "clip.npz"
        save_npz(clip, video=video, actions=acts)
        vae = build_vae("AutoencoderKL", tiny_vae_config("kl", 4, 4, width=32))

        def pixel_path():
            from minisora.data.clips import read_clip

            s = int(rng.integers(0, 300 - F + 1))
            frames, _ = read_clip(clip, "dmlab", s, F)
            vae.encode(frames_to_pixels(torch.from_numpy(frames))[None])

        results = [("minisora reader (shards in RAM, batched)", rate(ours, args.seconds, args.batch)),
                   ("  + posterior sample and normalise on CPU", rate(lambda: ours(True), args.seconds, args.batch)),
                   ("numpy memmap, slice per window", rate(memmap, args.seconds, args.batch)),
                   ("zarr, one read call per window", rate(naive_zarr, args.seconds, 8)),
                   ("pixels: npz + VAE per window (original minisora)", rate(pixel_path, args.seconds, 1))]
    ref = results[0][1]
    print(f"\nwindows of {F} x 4 x 16 x 16 fp16 latents, {args.clips} clips of 300 frames, batch {args.batch}")
    print(f"{'method':<52}{'windows/s':>14}{'vs minisora':>14}")
    for name, r in results:
        print(f"{name:<52}{r:>14,.0f}{r / ref:>13.3f}x")


if __name__ == "__main__":
    main()
