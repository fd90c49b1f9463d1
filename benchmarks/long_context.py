"""Long windows: the cost of a training step and of a generated frame against the window, short-window vs long-short.

    python benchmarks/long_context.py [--windows 8 16 32 64 128] [--short-frames 8] [--memory-pool 2]
                                      [--batch-size 2] [--steps 5] [--threads N]

The demo's DiT (tiny, 16x16 latents at patch 4: 16 tokens per frame), causal, fp32, random weights (the
work does not depend on them), at each window W, side by side in one run, the two models timed one
right after the other:
- "causal": today's model, every frame of the window at full resolution (quadratic in W);
- "long-short": the last --short-frames frames in full, older ones pooled --memory-pool^2 x (1/p^2 the keys).
Columns: one training step (a teacher-forcing pass over W frames, forward and backward, --batch-size
windows), and one generated frame of a rolling KV-cache rollout at window W in its steady state (the cache
full with W - 1 frames: --steps one-frame passes, then the pass that adds the frame to the cache), each the
best of --repeats after a warm-up; then each cost over its cost at the first window (how it grows).
"""

from __future__ import annotations

import argparse
import time

import torch

from minisora.flow import flow_loss, noisy
from minisora.kv_cache import KVCache
from minisora.model import VideoDiT

LATENT, CHANNELS = 16, 4


def build(short: int, args) -> VideoDiT:
    torch.manual_seed(0)
    extra = dict(short_frames=short, memory_pool=args.memory_pool) if short else {}
    dit = VideoDiT.from_preset("tiny", in_channels=CHANNELS, patch_size=args.patch_size, attention="causal", **extra)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0.0, 0.02)
    return dit


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up: masks, RoPE angles, allocations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def train_step(model: VideoDiT, window: int, args):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.batch_size, window, CHANNELS, LATENT, LATENT, generator=g)
    noise, t = torch.randn(x0.shape, generator=g), torch.rand(args.batch_size, window, generator=g)

    def step():
        model.train()
        model.zero_grad(set_to_none=True)
        flow_loss(model(noisy(x0, noise, t), t, clean=x0), x0, noise).backward()

    return step


def generated_frame(model: VideoDiT, window: int, args):
    model.eval()
    cache = KVCache(len(model.blocks))
    with torch.no_grad():  # the steady state: W - 1 frames cached
        model(torch.randn(1, window - 1, CHANNELS, LATENT, LATENT), torch.zeros(1, window - 1), kv_cache=cache,
              update_cache=True)
    x, t, zero = torch.randn(1, 1, CHANNELS, LATENT, LATENT), torch.rand(1, 1), torch.zeros(1, 1)

    @torch.no_grad()
    def frame():
        for _ in range(args.steps):
            model(x, t, kv_cache=cache)
        model(x, zero, kv_cache=cache, update_cache=True)
        cache.keep_last(window - 1)

    return frame


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, nargs="+", default=[8, 16, 32, 64, 128], help="Latent frames per window.")
    ap.add_argument("--short-frames", type=int, default=8, help="Long-short: frames attended in full.")
    ap.add_argument("--memory-pool", type=int, default=2, help="Long-short: older frames pooled P x P.")
    ap.add_argument("--patch-size", type=int, default=4, help="Spatial patch (4: the demo's 16 tokens per frame).")
    ap.add_argument("--batch-size", type=int, default=2, help="Windows per training step (the demo's 2).")
    ap.add_argument("--steps", type=int, default=5, help="Euler steps per generated frame (the demo's 5).")
    ap.add_argument("--repeats", type=int, default=2, help="Timed runs per cell (the best counts).")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    models = {"causal": build(0, args), "long-short": build(args.short_frames, args)}
    tokens = (LATENT // args.patch_size) ** 2
    print(f"tiny DiT, {tokens} tokens/frame, fp32, {torch.get_num_threads()} threads; training step: batch "
          f"{args.batch_size}, teacher forcing, forward + backward;\n"
          f"generated frame: {args.steps} steps + 1 cache pass; "
          f"long-short: the last {args.short_frames} frames in full, older ones pooled "
          f"{args.memory_pool}x{args.memory_pool} ({tokens // args.memory_pool ** 2} tokens)")
    names = list(models)
    print(f"{'':>7}{'training step, s':>22}{'generated frame, ms':>22}{'step growth':>16}{'frame growth':>16}")
    print(f"{'window':>7}" + f"{'causal':>11}{'long-short':>11}" * 4)
    first = {}
    for window in args.windows:
        step = {n: best_of(train_step(m, window, args), args.repeats) for n, m in models.items()}
        frame = {n: 1e3 * best_of(generated_frame(m, window, args), args.repeats) for n, m in models.items()}
        first = first or {"step": step, "frame": frame}
        cells = [f"{step[n]:>11.3f}" for n in names] + [f"{frame[n]:>11.1f}" for n in names]
        cells += [f"{cost[n] / first[key][n]:>10.1f}x" for key, cost in (("step", step), ("frame", frame))
                  for n in names]
        print(f"{window:>7}{''.join(cells)}", flush=True)
    print(f"growth: the cost at the window / the cost at window {args.windows[0]}")


if __name__ == "__main__":
    main()
