"""Training step time of the video DiT on cached latents vs the original minisora's pixel-space setup.

    python benchmarks/train.py [--presets tiny,small] [--batch 2] [--iters 5] [--precision fp32,bf16]
                               [--attention causal|full] [--peak-memory] [--compile] [--datasets dmlab]

For each preset, one row per input geometry, all with the same model class (minisora.model.VideoDiT):
  - latents  (minisora): 20 latent frames of 4 x h x w, patch 1x2x2, h x w = 64x64 / compression
  - pixels   (original minisora): 20 raw RGB frames, patch 2x4x4 (its DMLab/Minecraft config)
It times forward + backward + AdamW step on random inputs of those shapes (the data path is measured
by benchmarks/dataloader.py). By default the step is the one `minisora train` takes by default: a
causal model with teacher forcing (a 2T-frame pass, the window's clean copy then its noisy copy, as
stages.train.train_step); `--attention full` times a bidirectional model without it. `--precision`
takes a comma-separated list, so fp32 and bf16 are compared side by side in one run. Prints step
time, clips/s, tokens/s and, on CUDA, model FLOP utilisation: MFU = step FLOPs / step time /
--peak-tflops, with the step FLOPs of minisora.flops (matmuls per token, conditioning and adaLN per
frame, attention over the pairs the mask lets through; backward = 2 x forward), against 989 TFLOP/s
(H100/H200 SXM dense bf16) by default. `--peak-memory` adds the CUDA peak allocated memory of each
row (torch.cuda.max_memory_allocated after reset). `--compile` compiles the blocks as training does.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from minisora.flops import train_step_flops
from minisora.flow import FlowConfig, flow_loss, noisy, sample_times, teacher_forcing_times
from minisora.model import DIT_MODEL_SPECS, VideoDiT

# (name, frames, channels, height, width, patch_size_t, patch_size)
GEOMETRIES = {
    "dmlab": [("latents 4x VAE (16x16)", 20, 4, 16, 16, 1, 2), ("latents 8x VAE (8x8)", 20, 4, 8, 8, 1, 2),
              ("pixels 64x64, patch 2x4x4 (original)", 20, 3, 64, 64, 2, 4)],
    "minecraft": [("latents 4x VAE (32x32)", 20, 4, 32, 32, 1, 2), ("latents 8x VAE (16x16)", 20, 4, 16, 16, 1, 2),
                  ("pixels 128x128, patch 2x4x4 (original)", 20, 3, 128, 128, 2, 4)],
}
# minisora train's default recipe (stages.train.TrainConfig.flow): context noise 0.1, logit-normal centred at 0.5
TRAIN_FLOW = FlowConfig(context_noise=0.1, logit_mean=0.5)


def flops_mode(model: VideoDiT, teacher_forcing: bool) -> str:
    """The minisora.flops mode of a step of `model`."""
    return "teacher_forcing" if teacher_forcing else model.config.attention


def training_step(model: VideoDiT, opt: torch.optim.Optimizer, x0: torch.Tensor, dtype: torch.dtype | None,
                  teacher_forcing: bool, flow: FlowConfig = TRAIN_FLOW) -> Callable[[], torch.Tensor]:
    """One bare training step on the batch x0 (B, T, C, H, W): loss, backward, AdamW; the same model call as
    stages.train.train_step (teacher forcing: every frame noisy at its own t, a clean copy of the window at
    t_clean before it). Returns a function that takes the step and returns the loss (no host sync)."""
    device, (batch, frames) = x0.device, x0.shape[:2]

    def step() -> torch.Tensor:
        noise = torch.randn_like(x0)
        if teacher_forcing:
            t, t_clean = teacher_forcing_times(batch, frames, flow, device=device)
            clean, context = noisy(x0, torch.randn_like(x0), t_clean), None
        else:
            (t, context), clean, t_clean = sample_times(batch, frames, flow, device=device), None, None
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            v = model(noisy(x0, noise, t), t, clean=clean, clean_timesteps=t_clean)
        loss = flow_loss(v.float(), x0, noise, context)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def time_steps(step: Callable[[], torch.Tensor], iters: int, device: torch.device) -> list[float]:
    """Seconds of each of `iters` steps, after one warm-up step."""
    step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def bench(preset: str, geom, batch: int, iters: int, device: torch.device, precision: str,
          compile_model: bool = False, attention: str = "causal") -> dict:
    name, t, c, h, w, pt, p = geom
    model = VideoDiT.from_preset(preset, in_channels=c, patch_size=p, patch_size_t=pt, attention=attention).to(device)
    if compile_model:
        model.compile_blocks()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0 = torch.randn(batch, t, c, h, w, device=device)
    tokens = (t // pt) * (h // p) * (w // p)
    dtype = {"bf16": torch.bfloat16, "fp32": None}[precision]
    teacher = attention == "causal"  # as `minisora train`: teacher forcing for causal models
    times = time_steps(training_step(model, opt, x0, dtype, teacher), iters, device)
    sec = sorted(times)[len(times) // 2]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    flops = train_step_flops(model.config, t, h, w, batch, flops_mode(model, teacher)).total
    return {"preset": preset, "input": name, "tokens": tokens, "step_s": sec, "clips_s": batch / sec, "peak_gib": peak,
            "precision": precision, "attention": attention + (" + teacher forcing" if teacher else ""),
            "tokens_s": batch * tokens / sec, "tflops": flops / sec / 1e12,
            "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,small", help=f"comma-separated, from {', '.join(DIT_MODEL_SPECS)}")
    ap.add_argument("--datasets", default="dmlab,minecraft")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--precision", default="fp32", help="comma-separated list of fp32, bf16 (one row each)")
    ap.add_argument("--peak-memory", action="store_true", help="add the CUDA peak allocated memory of each row (GiB)")
    ap.add_argument("--compile", action="store_true", help="compile the blocks (as `minisora train` on CUDA)")
    ap.add_argument("--attention", default="causal", choices=("causal", "full"),
                    help="causal: with teacher forcing, as `minisora train` by default; full: without")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100 SXM: 989)")
    ap.add_argument("--skip-pixels-over", type=int, default=0,
                    help="skip pixel rows with more tokens than this (0: none)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precisions = args.precision.split(",")
    if any(x not in ("fp32", "bf16") for x in precisions):
        ap.error(f"--precision {args.precision}: each entry must be fp32 or bf16")
    if device.type == "cuda":
        from minisora.hardware import enable_tf32

        enable_tf32()  # as training does: fp32 rows use TF32 matmuls
    rows = []
    for ds in args.datasets.split(","):
        for preset in args.presets.split(","):
            for geom in GEOMETRIES[ds]:
                tokens = (geom[1] // geom[5]) * (geom[3] // geom[6]) * (geom[4] // geom[6])
                if args.skip_pixels_over and geom[2] == 3 and tokens > args.skip_pixels_over:
                    continue
                for precision in precisions:
                    r = bench(preset, geom, args.batch, args.iters, device, precision, args.compile,
                              args.attention)
                    r["dataset"] = ds
                    rows.append(r)
                    print(f"  done {ds} {preset} {geom[0]} {precision}: {r['step_s'] * 1e3:.1f} ms/step", flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{name}, batch {args.batch}, median of {args.iters} steps (fwd + bwd + AdamW), {rows[0]['attention']}"
          + (f", MFU against {args.peak_tflops:g} TFLOP/s" if device.type == "cuda" else ""))
    hdr = f"{'dataset':<10}{'preset':<7}{'input':<40}{'prec':<6}{'tokens':>7}{'ms/step':>10}{'clips/s':>10}"
    hdr += f"{'tokens/s':>12}" + (f"{'MFU':>7}" if device.type == "cuda" else "")
    hdr += f"{'peak GiB':>10}" if args.peak_memory else ""
    hdr += f"{'vs pixels':>11}"
    print(hdr)
    for r in rows:
        same = [x for x in rows if (x["dataset"], x["preset"], x["precision"]) == (r["dataset"], r["preset"],
                                                                                    r["precision"])]
        pixel = next((x for x in same if "pixels" in x["input"]), None)
        line = (f"{r['dataset']:<10}{r['preset']:<7}{r['input']:<40}{r['precision']:<6}{r['tokens']:>7}"
                f"{r['step_s'] * 1e3:>10.1f}{r['clips_s']:>10.2f}{r['tokens_s']:>12,.0f}")
        if device.type == "cuda":
            line += f"{r['tflops'] / args.peak_tflops:>7.1%}"
        if args.peak_memory:
            line += f"{r['peak_gib']:>10.2f}"
        line += f"{pixel['step_s'] / r['step_s']:>10.1f}x" if pixel else f"{'-':>11}"
        print(line)


if __name__ == "__main__":
    main()
