"""What teacher forcing costs per training step, at the demo's geometry, against the prefix mix.

    python benchmarks/teacher_forcing.py [--preset tiny] [--iters 20] [--precision fp32]

A teacher-forced window runs 2T frames through the causal DiT (a clean copy, then the noisy one), so
it costs about twice the tokens of a window of the old mix. Rows, all on random latents of the demo's
shape (windows of 8 latent frames of 4 x 16 x 16, patch 4, actions): the old mix at batch 4 (the
demo before the recipe study), teacher forcing at batch 2 (the demo now: the same tokens per step)
and at batch 4. Each row times forward + backward + AdamW, after 3 warm-up steps, and prints ms per
step, windows/s and the step time relative to the first row.
"""

from __future__ import annotations

import argparse
import time

import torch

from minisora.flow import FlowConfig, flow_loss, noisy, sample_times, teacher_forcing_times
from minisora.hardware import cpu_facts
from minisora.model import VideoDiT

FRAMES, CHANNELS, SIZE, ACTIONS = 8, 4, 16, 4


def step_time(model: VideoDiT, batch: int, teacher: bool, iters: int, dtype) -> float:
    """Median seconds of one training step (forward, backward, AdamW)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    flow = FlowConfig(p_full=0.2, p_prefix=0.6, p_independent=0.2, context_noise=0.1)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, FRAMES, CHANNELS, SIZE, SIZE, generator=gen)
    actions = torch.randint(0, ACTIONS, (batch, FRAMES), generator=gen)
    times = []
    for i in range(iters + 3):
        t0 = time.perf_counter()
        noise = torch.randn(x0.shape, generator=gen)
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            if teacher:
                t, t_clean = teacher_forcing_times(batch, FRAMES, flow, generator=gen)
                v = model(noisy(x0, noise, t), t, actions, clean=noisy(x0, torch.randn(x0.shape, generator=gen),
                                                                       t_clean), clean_timesteps=t_clean)
                context = None
            else:
                t, context = sample_times(batch, FRAMES, flow, generator=gen)
                v = model(noisy(x0, noise, t), t, actions)
        flow_loss(v.float(), x0, noise, context).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--iters", type=int, default=20, help="timed steps per row (the median is printed)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    print(f"{cpu_facts().describe()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.precision}; "
          f"{args.preset} causal DiT, windows of {FRAMES} x {CHANNELS}x{SIZE}x{SIZE} latents, patch 4")
    rows = [("prefix mix (the old demo)", 4, False), ("teacher forcing (the demo now)", 2, True),
            ("teacher forcing", 4, True)]
    base = None
    print(f"{'recipe':32s} {'batch':>5s} {'ms/step':>8s} {'windows/s':>10s} {'step vs row 1':>14s}")
    for name, batch, teacher in rows:
        torch.manual_seed(0)
        model = VideoDiT.from_preset(args.preset, in_channels=CHANNELS, patch_size=4, num_actions=ACTIONS,
                                     attention="causal").train()
        seconds = step_time(model, batch, teacher, args.iters, dtype)
        base = base or seconds
        print(f"{name:32s} {batch:5d} {seconds * 1e3:8.1f} {batch / seconds:10.1f} {seconds / base:13.2f}x")


if __name__ == "__main__":
    main()
