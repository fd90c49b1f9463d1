"""Long-rollout speed: full attention with window recompute vs causal attention with a KV cache.

    python benchmarks/rollout.py [--model tiny] [--window 16] [--long-window 64] [--frames 300] [--steps 20]
                                 [--chunk 1] [--short-frames 8] [--memory-pool 2] [--device cpu] [--threads N]
                                 [--rows 1,2,8] [--no-compiled]

Continues 4 clean context latent frames to --frames latent frames with DiTPipeline, window by
window, at the same model size, window, chunk and steps (random weights: the work does not depend
on them), side by side in one run:
  1. full attention, window recompute (every Euler step runs the whole window);
  2. causal attention, window recompute (the same work, a masked attention);
  3. causal attention, KV cache "window" (context recomputed once per window, then only new tokens);
  4. causal attention, KV cache "rolling" (the pipeline's default: each frame's keys/values once);
  5. long-short attention (--short-frames, --memory-pool), KV cache "rolling".
Then, at --long-window (64), rows 4 and 5 again: the cost of a generated frame against the window.
Row 8 runs the whole rollout of row 4, from 4 context frames to --frames. Rows 1-3 would
take minutes to get there, so every mode is first timed in its steady state, which is what almost
all of a long rollout costs: from window - chunk context frames (every window full), the time of
2 + --timed-frames windows less that of the first two (which also fill the KV cache), one mode
right after the other, so that a shared machine's load drifts little between them. (From 4
context frames to 300 the recompute's first 12 windows are shorter: that would make it 1.3%
faster at window 16.) Rows 9-11 (unless --no-compiled) are rows 1, 4 and 8 compiled: the recompute's model by
`model.compile()`, the rolling cache by the pipeline's compile=True (on a full `KVRing`, each
frame's Euler steps and commit in one compiled call: VideoDiT.euler_frame); compile time is left out
(their warm-up is the timed rollout itself, so every compiled pass has run). The last lines give the
speed-ups over row 1: of the steady states, and of the whole rolling rollout, the pipeline's
default; then the same of the compiled rows (row 11 over row 9), before them what compiling gained,
and before that the cost of a generated frame at --long-window over its cost at --window.
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from minisora.hardware import cpu_facts, cpu_model
from minisora.model import DIT_MODEL_SPECS, VideoDiT
from minisora.pipeline import DiTPipeline
from minisora.vae import build_vae, tiny_vae_config

CONTEXT = 4
# (attention, kv_cache mode, window, whole rollout?, compiled?, label); the steady-state rows first, close together in
# time; window "long" is --long-window, else --window; attention "long-short" is causal with --short-frames
ROWS = [("full", "off", "short", False, False, "full attention, window recompute"),
        ("causal", "rolling", "short", False, False, "causal attention, KV cache (rolling)"),
        ("causal", "off", "short", False, False, "causal attention, window recompute"),
        ("causal", "window", "short", False, False, "causal attention, KV cache (window)"),
        ("long-short", "rolling", "short", False, False, "long-short attention, KV cache (rolling)"),
        ("causal", "rolling", "long", False, False, "causal attention, KV cache (rolling)"),
        ("long-short", "rolling", "long", False, False, "long-short attention, KV cache (rolling)"),
        ("causal", "rolling", "short", True, False, "causal attention, KV cache (rolling)"),
        ("full", "off", "short", False, True, "full attention, window recompute"),
        ("causal", "rolling", "short", False, True, "causal attention, KV cache (rolling)"),
        ("causal", "rolling", "short", True, True, "causal attention, KV cache (rolling)")]


def build(attention: str, window: int, compiled: bool, args, vae) -> DiTPipeline:
    torch.manual_seed(0)
    extra = dict(short_frames=args.short_frames, memory_pool=args.memory_pool) if attention == "long-short" else {}
    dit = VideoDiT.from_preset(args.model, in_channels=4, patch_size=args.patch_size,
                               attention="full" if attention == "full" else "causal", **extra)
    with torch.no_grad():  # the work does not depend on the weights; random ones make the latents move
        for p in dit.parameters():
            p.normal_(0.0, 0.02)
    if compiled and attention == "full":  # what a user does to compile a model; the rolling rows: compile=True
        dit.compile(dynamic=False)
    pipe = DiTPipeline(dit, vae.model, FlowMatchEulerDiscreteScheduler(), window_frames=window,
                       latent_size=[args.latent_size] * 2).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def time_rollout(pipe: DiTPipeline, context: int, frames: int, mode: str, args, compiled: bool = False) -> float:
    ctx = torch.randn(1, context, 4, args.latent_size, args.latent_size, device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = pipe(context_latents=ctx, num_frames=frames, num_inference_steps=args.steps, chunk=args.chunk, kv_cache=mode,
               generator=torch.Generator().manual_seed(0), output_type="latent", progress=False,
               compile=compiled and mode == "rolling")
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    assert out.kv_cache == mode and out.latents.shape[1] == frames
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", choices=sorted(DIT_MODEL_SPECS), help="VideoDiT size preset.")
    ap.add_argument("--window", type=int, default=16, help="Latent frames per window (the training window).")
    ap.add_argument("--long-window", type=int, default=64, help="The second table's window (rolling rows only).")
    ap.add_argument("--short-frames", type=int, default=8, help="Long-short rows: frames attended in full.")
    ap.add_argument("--memory-pool", type=int, default=2, help="Long-short rows: older frames pooled P x P.")
    ap.add_argument("--frames", type=int, default=300, help="Latent frames of the rollout, 4 context frames included.")
    ap.add_argument("--timed-frames", type=int, default=6,
                    help="New latent frames that the recompute and window-cache rows generate in their steady state.")
    ap.add_argument("--steps", type=int, default=20, help="Euler steps per window.")
    ap.add_argument("--chunk", type=int, default=1, help="New latent frames per window.")
    ap.add_argument("--patch-size", type=int, default=2, help="Spatial patch: tokens/frame = (latent size / patch)^2.")
    ap.add_argument("--latent-size", type=int, default=16, help="Latent height = width (16: a 64x64 frame, 4x VAE).")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (fp32 either way).")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    ap.add_argument("--rows", default=None,
                    help="Comma-separated row numbers (1-11, in the order the tables print them) to run, for quick "
                         "comparisons (default: all); the summary lines print where their rows ran.")
    ap.add_argument("--no-compiled", action="store_true", help="Skip rows 9-11 (the compiled ones).")
    args = ap.parse_args()
    rows = ROWS if args.rows is None else [ROWS[int(r) - 1] for r in args.rows.split(",")]
    rows = [r for r in rows if not (args.no_compiled and r[4])]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    vae = build_vae("kl", tiny_vae_config("kl"))  # only there to complete the pipeline: nothing is decoded
    tokens = (args.latent_size // args.patch_size) ** 2
    if args.device == "cpu":  # which machine the figures come from
        print(f"{cpu_model()}, {cpu_facts().describe()}, torch {torch.__version__}")
    print(f"{args.model} DiT, chunk {args.chunk}, {args.steps} steps, {tokens} tokens/frame, {args.device}, "
          f"{torch.get_num_threads()} threads; long-short: the last {args.short_frames} frames in full, older ones "
          f"pooled {args.memory_pool}x{args.memory_pool} ({tokens // args.memory_pool ** 2} tokens)")
    rates, table = {}, None
    for attention, mode, size, whole, compiled, label in rows:
        window = args.long_window if size == "long" else args.window
        if (size, whole, compiled) != table:
            table = (size, whole, compiled)
            what = f"{CONTEXT} context -> {args.frames} latent frames" if whole else "steady state"
            print(f"\nwindow {window}, {what}{', compiled' if compiled else ''}\n"
                  f"{'mode':<42}{'context -> frames':>18}{'seconds':>10}{'frames/s':>10}")
        pipe = build(attention, window, compiled, args, vae)
        context = CONTEXT if whole else window - args.chunk
        frames = args.frames if whole else context + 2 * args.chunk + args.timed_frames
        time_rollout(pipe, context, frames if compiled else context + 2 * args.chunk, mode, args, compiled)  # warm-up
        seconds = time_rollout(pipe, context, frames, mode, args, compiled)
        if not whole:  # less the first two windows (and the cache's first fill): the steady state alone
            seconds -= time_rollout(pipe, context, context + 2 * args.chunk, mode, args, compiled)
            context += 2 * args.chunk
        rates[(attention, mode, size, whole, compiled)] = (frames - context) / seconds
        print(f"{label:<42}{f'{context} -> {frames}':>18}{seconds:>10.2f}{(frames - context) / seconds:>10.3f}",
              flush=True)
    summary(rates, args)


def summary(rates: dict, args) -> None:
    """The last lines: growth with the window, and the speed-ups over row 1 (each where its rows ran)."""
    growth = {a: rates[(a, "rolling", "short", False, False)] / rates[(a, "rolling", "long", False, False)]
              for a in ("causal", "long-short") if (a, "rolling", "long", False, False) in rates
              and (a, "rolling", "short", False, False) in rates}
    if growth:
        print(f"\ncost of a generated frame at window {args.long_window} / window {args.window} (rolling KV cache): "
              + ", ".join(f"{a} {g:.2f}x" for a, g in growth.items()))
    if ("full", "off", "short", False, True) in rates and ("full", "off", "short", False, False) in rates:
        gain = {w: rates[("causal", "rolling", "short", w, True)] / rates[("causal", "rolling", "short", w, False)]
                for w in (False, True) if ("causal", "rolling", "short", w, True) in rates
                and ("causal", "rolling", "short", w, False) in rates}
        full = rates[("full", "off", "short", False, True)] / rates[("full", "off", "short", False, False)]
        print(f"compiled over eager: full recompute {full:.2f}x" + "".join(
            f", rolling KV cache ({'whole rollout' if w else 'steady state'}) {g:.2f}x" for w, g in gain.items()))
    for compiled in (False, True):
        full = rates.get(("full", "off", "short", False, compiled))
        if full is None:
            continue
        both = ", both compiled" if compiled else ""
        steady = {mode: rates[("causal", mode, "short", False, compiled)] / full for mode in ("window", "rolling")
                  if ("causal", mode, "short", False, compiled) in rates}
        if steady:
            print(f"steady state over full recompute{both}: "
                  + ", ".join(f"kv-cache ({n}) {r:.1f}x" for n, r in steady.items()))
        if ("causal", "rolling", "short", True, compiled) in rates:
            print(f"kv-cache speed-up over full recompute{both}: "
                  f"{rates[('causal', 'rolling', 'short', True, compiled)] / full:.1f}x")


if __name__ == "__main__":
    main()
