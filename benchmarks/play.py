"""`minisora play`'s speed without a browser: frames per second and key-to-frame latency.

    python benchmarks/play.py --checkpoint RUN [--frames 200] [--steps 5] [--precision fp32,bf16] [--device cpu]
                              [--threads 1,2] [--compile off,on]

For each precision, thread count and --compile setting (`minisora play --compile`: once the rolling cache is
full, the compiled passes on a KVRing; the compile falls in the warm-up), side by side in one run, from the
run's own store clip test:0 (4 context frames):
  1. the live generator alone (minisora.live.LiveGenerator.step in a loop): one frame per step, the
     rolling KV cache, VAE decoding included; frames per second and milliseconds per frame;
  2. through the WebSocket, as the page drives it (minisora.play_app served by uvicorn in a thread, a
     Python client in this process that draws nothing): it acknowledges every frame on arrival and
     changes the held action every --hold frames, cycling through the dataset's keyed actions.
     Frames per second as received; key-to-frame latency from sending the new action to receiving
     the first frame generated with it (under the run-ahead rule: at most two frame times).
The first --warmup frames of each row are not timed (allocator and oneDNN warm-up, and the compile).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import time

import numpy as np
import torch


def live_row(playable_cfg, precision: str, args, compile: bool) -> dict:
    from minisora.context import load_context
    from minisora.live import LiveGenerator
    from minisora.pipeline import DiTPipeline
    from minisora.run_dir import precision_dtype
    from minisora.run_dir import read_description
    from stages.play import context_source

    pipe = DiTPipeline.from_run(args.checkpoint, args.device, precision_dtype(precision, torch.device(args.device)))
    ctx = load_context(pipe, context_source(playable_cfg, read_description(args.checkpoint)), 4)
    live = LiveGenerator(pipe, ctx.latents, ctx.actions, steps=args.steps, compile=compile)
    idle = pipe.transformer.config.num_actions - 1
    for _ in range(args.warmup):
        live.step(idle)
    seconds = []
    start = time.perf_counter()
    for _ in range(args.frames):
        seconds.append(live.step(idle).seconds)
    wall = time.perf_counter() - start
    return {"fps": args.frames / wall, "ms": 1000 * np.array(seconds)}


async def drive(url: str, keyed: list[int], idle: int, args) -> dict:
    """Play like the page: ack every frame, hold each action for args.hold frames; (fps, latencies)."""
    import websockets

    async with websockets.connect(url.replace("http://", "ws://") + "ws") as ws:
        frames, latencies, pressed, t0 = 0, [], None, None
        cycle = [*keyed, idle]
        while frames < args.warmup + args.frames:
            m = await ws.recv()
            if isinstance(m, str):
                continue
            n = struct.unpack(">I", m[:4])[0]
            h = json.loads(m[4:4 + n])
            if h["type"] != "frame":
                continue
            now = time.perf_counter()
            frames += 1
            if frames == args.warmup:
                t0 = now
            if pressed is not None and h["action"] == pressed[0]:
                if frames > args.warmup:
                    latencies.append(now - pressed[1])
                pressed = None
            await ws.send(json.dumps({"type": "shown", "seq": h["seq"]}))
            if frames % args.hold == 0 and pressed is None:
                action = cycle[(frames // args.hold) % len(cycle)]
                pressed = (action, time.perf_counter())
                await ws.send(json.dumps({"type": "action", "action": action}))
        return {"fps": args.frames / (time.perf_counter() - t0), "latency_ms": 1000 * np.array(latencies)}


def websocket_row(args, precision: str, threads: int, compile: bool) -> dict:
    """Serve with `minisora play` in its own process (as a user would; the page's work stays out of it) and drive it."""
    import os
    import re
    import signal
    import subprocess
    import sys

    from minisora.plugins import fresh_world_env

    env = fresh_world_env(dict(os.environ))
    cmd = [sys.executable, "-m", "cli.main", "play", "--checkpoint", args.checkpoint, "--steps", str(args.steps),
           "--threads", str(threads),
           "--precision", precision, "--device", args.device, "--record-dir", "/tmp/minisora-play-benchmark",
           "--compile" if compile else "--no-compile"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        while not (url := re.search(r"open (http://\S+) in a browser", lines[-1] if lines else "")):
            lines.append(proc.stdout.readline())
            if not lines[-1] and proc.poll() is not None:
                raise RuntimeError("minisora play ended:\n" + "".join(lines))
        keys = re.search(r"keys: (.*); no key = .*?\((-?\d+)\)", "".join(lines))
        keyed = sorted({int(a) for a in re.findall(r"\((\d+)\)", keys.group(1))})
        return asyncio.run(drive(url.group(1), keyed, int(keys.group(2)), args))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def main() -> None:
    from minisora.hardware import cpu_facts
    from stages.play import PlayConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=PlayConfig.steps)
    p.add_argument("--hold", type=int, default=10, help="frames between action changes")
    p.add_argument("--precision", default="fp32,bf16")
    p.add_argument("--threads", default="1,2", help="torch CPU threads of the generator, comma-separated")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", default="off,on", help="rows without and with `minisora play --compile`")
    args = p.parse_args()
    if args.warmup < 8:
        p.error("--warmup must cover the frames before the cache is full and the compile (the demo's window 8: >= 8)")
    print(f"{cpu_facts().describe()}, torch {torch.__version__}; {args.checkpoint}, {args.steps} Euler steps per "
          f"frame, {args.frames} timed frames")
    rows = []
    for precision in args.precision.split(","):
        for threads in map(int, args.threads.split(",")):
            for compile in (c == "on" for c in args.compile.split(",")):
                torch.set_num_threads(threads)
                cfg = PlayConfig(checkpoint=args.checkpoint, steps=args.steps, device=args.device, precision=precision)
                rows.append((precision, threads, compile, live_row(cfg, precision, args, compile),
                             websocket_row(args, precision, threads, compile)))
    print("\n| precision | threads | compile | live generator fps | ms/frame p50 / p95 | WebSocket fps "
          "| key-to-frame ms mean / p95 / max |")
    print("|---|---|---|---|---|---|---|")
    for precision, threads, compile, live, ws in rows:
        lat = ws["latency_ms"]
        print(f"| {precision} | {threads} | {'on' if compile else 'off'} | {live['fps']:.1f} | "
              f"{np.percentile(live['ms'], 50):.1f} / "
              f"{np.percentile(live['ms'], 95):.1f} | {ws['fps']:.1f} | {lat.mean():.0f} / "
              f"{np.percentile(lat, 95):.0f} / {lat.max():.0f} ({len(lat)} presses) |")


if __name__ == "__main__":
    main()
