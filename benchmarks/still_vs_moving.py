"""Where a continuation wins or loses against latent copy: PSNR of the mean MSE over still and moving targets.

    python benchmarks/still_vs_moving.py --checkpoint RUN --store STORE [--steps 20] [--seed 0]

On the held-out split, as `minisora eval` does it (its clip choice, context, rollout and metrics
helpers; 4 context and 12 generated latent frames, 16 clips), the target frames are split into those
equal to their previous frame (still) and the rest (moving). One row per method (the model at one
seed, latent copy, the VAE reconstruction), with the PSNR of the MSE averaged over each group and over
all. On the calm synthetic family most targets are still, and latent copy is exact there up to the
VAE; this shows whether a model's gain on moving frames outweighs its error on still ones.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from minisora.metrics import frames_to_unit
from minisora.pipeline import DiTPipeline
from minisora.store import LatentStore
from stages.evaluate import EvalConfig, _decode_all, _generate, _load_clips


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="run, checkpoint or pipeline directory")
    ap.add_argument("--store", required=True, help="latent store with the test split")
    ap.add_argument("--steps", type=int, default=20, help="Euler steps per window")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed of the model's row")
    args = ap.parse_args()
    cfg = EvalConfig(checkpoint=args.checkpoint, store=args.store, out="unused.json", batch_size=16, seeds=1,
                     steps=args.steps)
    pipe = DiTPipeline.from_run(cfg.checkpoint, torch.device("cpu"), torch.float32)
    pipe.set_progress_bar_config(disable=True)
    k, n = cfg.context_frames, cfg.frames  # latent frames; image VAEs: as many pixel frames
    _, _, truth, latents, actions = _load_clips(cfg, pipe, LatentStore(cfg.store), n)
    target = frames_to_unit(truth)[:, k:n]  # (M, N - K, 3, H, W)
    still = (truth[:, k:n] == truth[:, k - 1:n - 1]).reshape(len(truth), n - k, -1).all(-1)  # (M, N - K)
    copied = latents.clone()
    copied[:, k:] = latents[:, k - 1:k]  # the last context latent, repeated
    methods = {
        f"model (seed {args.seed}, {args.steps} steps)":
            _generate(cfg, pipe, latents, actions, args.seed, n, pipe.kv_cache_mode("auto"))[:, k:n],
        "latent copy": _decode_all(pipe, copied, cfg.batch_size)[:, k:n],
        "VAE reconstruction": _decode_all(pipe, latents, cfg.batch_size)[:, k:n],
    }
    print(f"{len(truth)} clips x {n - k} generated frames; {still.mean():.0%} of the targets are still")
    print(f"{'method':32s} {'still':>8s} {'moving':>8s} {'all':>8s}   (PSNR of the mean MSE, dB)")
    for name, frames in methods.items():
        mse = ((frames_to_unit(frames) - target) ** 2).flatten(2).mean(-1).numpy()  # (M, N - K), images in [0, 1]
        psnr = [10 * np.log10(1 / mse[m].mean()) for m in (still, ~still, np.ones_like(mse, bool))]
        print(f"{name:32s} " + " ".join(f"{p:8.2f}" for p in psnr))


if __name__ == "__main__":
    main()
