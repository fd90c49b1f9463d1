"""Is a whole rollout slower than its steady state? The rate of every 20 frames along whole rollouts.

    python benchmarks/rollout_drift.py [--repeats 2] [--threads N]

benchmarks/rollout.py times the rolling KV cache twice: in its steady state (6 frames after 15 cached ones) and
over a whole 4 -> 300 rollout. This script runs both in one process, --repeats times (steady state, whole rollout,
steady state again), and prints the rate of every 20 generated frames along each whole rollout: a rollout that
slows as it goes shows a falling row, a machine whose speed swings shows rows that differ without a trend.
Same model and settings as rollout.py's defaults (tiny DiT, window 16, chunk 1, 20 Euler steps, 64 tokens a frame).
"""

from __future__ import annotations

import argparse
import time

import torch

from rollout import build, build_vae, time_rollout, tiny_vae_config

EVERY = 20  # generated frames per printed rate


def steady(pipe, args) -> float:
    """Frames per second of 6 frames generated after 15 cached ones (rollout.py's steady state)."""
    return 6 / (time_rollout(pipe, 15, 22, "rolling", args) - time_rollout(pipe, 15, 16, "rolling", args))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2, help="Whole rollouts, each between two steady-state timings.")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    cli = ap.parse_args()
    if cli.threads:
        torch.set_num_threads(cli.threads)
    torch.set_flush_denormal(True)
    args = argparse.Namespace(model="tiny", patch_size=2, latent_size=16, short_frames=8, memory_pool=2,
                              device="cpu", steps=20, chunk=1)
    pipe = build("causal", 16, args, build_vae("kl", tiny_vae_config("kl")))
    stamps: list[float] = []
    commit = pipe._commit

    def stamped(*a, **k):  # a generated frame is done when it is committed to the cache
        stamps.append(time.perf_counter())
        return commit(*a, **k)

    pipe._commit = stamped
    print(f"tiny DiT, window 16, chunk 1, 20 steps, cpu, {torch.get_num_threads()} threads", flush=True)
    time_rollout(pipe, 15, 16, "rolling", args)  # warm-up
    for _ in range(cli.repeats):
        print(f"steady 15 -> 22: {steady(pipe, args):.3f} frames/s", flush=True)
        stamps.clear()
        start = time.perf_counter()
        total = time_rollout(pipe, 4, 300, "rolling", args)
        at = [start] + stamps[1:]  # stamps[0]: the context's commit
        rates = [EVERY / (at[i + EVERY] - at[i]) for i in range(0, len(at) - EVERY, EVERY)]
        print(f"whole 4 -> 300: {296 / total:.3f} frames/s; per {EVERY} frames: "
              + " ".join(f"{r:.2f}" for r in rates), flush=True)
        print(f"steady 15 -> 22 after: {steady(pipe, args):.3f} frames/s", flush=True)


if __name__ == "__main__":
    main()
