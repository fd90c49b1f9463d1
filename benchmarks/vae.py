"""The offline VAE's training step before and after the speed changes, at 64x64 and 128x128.

    python benchmarks/vae.py [--sizes 64,128] [--steps 200] [--rounds 8] [--threads N]

Frames come from the synthetic renderers (DMLab-shaped 64x64, Minecraft-shaped 128x128), rendered
in memory. Two phases, so that a loaded machine skews the comparison as little as possible:

1. speed: every variant's model steps in turn, round-robin, `--rounds` times; the median ms/step
   of each is taken from the same stretch of wall-clock time (ratios between rows are what to read);
2. quality: each variant trains from the same seed for as many steps as fit in the time the
   "before" variant takes for `--steps` steps (a quarter of them at 128x128), by the ratio of the
   speed phase. It reports held-out PSNR of uint8 reconstructions of the posterior mean
   (stages.vae_train.psnr), the mean-frame baseline, and the dB gained over that baseline per
   minute at the measured speed. The quality runs are step-bounded, so their PSNR is reproducible;
   only the step counts follow the machine's speed ratios.

The training step is stages.vae_train's own (`_step`: L1 + KL, Adam at 1e-3).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from minisora.hardware import cpu_facts, resolve_precision
from minisora.vae import VideoVAE, frames_to_pixels, tiny_vae_config
from stages.vae_train import VAETrainConfig, _step, psnr, reconstruct


@dataclass(frozen=True)
class Variant:
    name: str
    channels_last: bool
    batch: int
    width: int = 16
    first_width: int | None = None


VARIANTS = [
    Variant("before: NCHW, (16,32,64..), 8 frames/step", channels_last=False, batch=8),
    Variant("channels_last", channels_last=True, batch=8),
    Variant("channels_last, first level 8", channels_last=True, batch=8, first_width=8),
    Variant("channels_last, first level 8, 4 frames/step", channels_last=True, batch=4, first_width=8),
]
SIZES = {64: ("dmlab", 4), 128: ("minecraft", 8)}  # frame size -> (renderer, downsample of the VAE)


def render(kind: str, clips: int, frames: int, seed: int) -> np.ndarray:
    from minisora.data.synthetic import render_dmlab_clip, render_minecraft_clip

    fn = render_dmlab_clip if kind == "dmlab" else render_minecraft_clip
    return np.concatenate([fn(seed + i, frames)[0] for i in range(clips)])  # uint8 (N, H, W, 3)


def build(v: Variant, downsample: int, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(**tiny_vae_config("kl", 4, downsample, v.width, first_width=v.first_width))
    fmt = torch.channels_last if v.channels_last else torch.contiguous_format
    model.to(memory_format=fmt).train()
    return model, torch.optim.Adam(model.parameters(), lr=1e-3), fmt


def train_step(model, opt, fmt, frames: np.ndarray, v: Variant, rng, gen, cfg, precision) -> None:
    pixels = frames_to_pixels(frames[rng.integers(len(frames), size=v.batch)]).to(memory_format=fmt)
    loss, _ = _step(model, pixels, cfg, gen, precision)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def speed(variants, downsample, frames, rounds, cfg, precision) -> dict[str, float]:
    """Median ms/step per variant, measured round-robin."""
    state = {v: (*build(v, downsample, 0), np.random.default_rng(0), torch.Generator().manual_seed(0))
             for v in variants}
    times: dict[Variant, list[float]] = {v: [] for v in variants}
    for r in range(rounds + 1):
        for v in variants:
            model, opt, fmt, rng, gen = state[v]
            t = time.perf_counter()
            train_step(model, opt, fmt, frames, v, rng, gen, cfg, precision)
            if r:  # round 0 warms up
                times[v].append((time.perf_counter() - t) * 1000)
    return {v.name: statistics.median(times[v]) for v in variants}


def quality(v: Variant, downsample, train, held_out, steps, cfg, precision) -> float:
    model, opt, fmt = build(v, downsample, 0)
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    for _ in range(steps):
        train_step(model, opt, fmt, train, v, rng, gen, cfg, precision)
    model.eval().to(memory_format=torch.contiguous_format)
    recon, _ = reconstruct(VideoVAE.from_model(model, source="benchmark"), held_out)
    return psnr(held_out, recon)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,128", help="frame sizes: 64 (DMLab-shaped, 4x VAE), 128 (Minecraft, 8x)")
    ap.add_argument("--steps", type=int, default=200, help="quality phase: steps of the 'before' variant at "
                    "64x64 (a quarter at 128x128); the others get the same time at their speed")
    ap.add_argument("--rounds", type=int, default=8, help="timed steps per variant in the speed phase")
    ap.add_argument("--clips", type=int, default=6, help="rendered training clips per size (100 frames each)")
    ap.add_argument("--precision", default="fp32", help="autocast of the step: auto, fp32, bf16")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = resolve_precision(args.precision, "cpu")
    print(f"{cpu_facts().describe()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{precision.line()}")
    cfg = VAETrainConfig(manifest="", out="")  # the loss settings of `minisora vae train`
    for size in (int(s) for s in args.sizes.split(",")):
        kind, downsample = SIZES[size]
        train, held_out = render(kind, args.clips, 100, seed=0), render(kind, 2, 100, seed=1000)[::3]
        baseline = psnr(held_out, np.broadcast_to(held_out.mean(0).round().astype(np.uint8), held_out.shape))
        ms = speed(VARIANTS, downsample, train, args.rounds, cfg, precision)
        before = ms[VARIANTS[0].name]
        base_steps = max(1, args.steps * 64 * 64 // (size * size))
        minutes = base_steps * before / 60000
        print(f"\n{size}x{size} ({kind}-shaped, {downsample}x VAE), {len(held_out)} held-out frames, "
              f"mean-frame baseline {baseline:.2f} dB; each variant trains {minutes:.1f} min at its measured speed")
        print(f"{'variant':46s} {'ms/step':>8s} {'speed-up':>8s} {'steps':>6s} {'PSNR dB':>8s} {'dB/min':>7s}")
        for v in VARIANTS:
            steps = max(1, round(base_steps * before / ms[v.name]))
            value = quality(v, downsample, train, held_out, steps, cfg, precision)
            per_min = (value - baseline) / minutes
            print(f"{v.name:46s} {ms[v.name]:8.1f} {before / ms[v.name]:7.2f}x {steps:6d} {value:8.2f} "
                  f"{per_min:+7.2f}", flush=True)


if __name__ == "__main__":
    main()
