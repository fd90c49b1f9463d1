"""Where a rollout's one-frame pass spends its time (the profile behind benchmarks/rollout.py's rows).

    python benchmarks/one_frame_pass.py [--threads 1,2] [--cached 15] [--passes 200]

The tiny DiT (random weights: the work does not depend on them), causal, patch 2, a KV cache holding --cached
clean frames, side by side in one run for each thread count:
  1. one Euler-step pass of one new frame at 16x16 latents (64 tokens/frame, benchmarks/rollout.py's shape);
  2. the same at 2x2 latents (1 token/frame): the same ops on almost no data, i.e. the fixed per-op cost;
  3. a rollout's per-frame cache update at 16x16: `VideoDiT.commit` (keys and values only), then `keep_last`,
     and the same update by a whole committing forward (`update_cache=True`, which also computes a velocity);
  4. rows 1 and 3 on a full `KVRing` (the same keys at fixed shapes), eager and compiled (VideoDiT.compile_rollout,
     what `DiTPipeline(..., compile=True)` runs once a rolling cache is full; compile time left out of the rows and
     printed below the table: the compiled copy's first pass and first commit, inductor's FX graph cache off (its
     kernels may still come from inductor's on-disk cache: for a machine's very first compile, run with
     TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)));
  5. the attention kernel alone at the pass's shape (64 queries over (cached + 1) x 64 keys, 3 heads of 64):
     torch's SDPA against the math path (q k^T, softmax, times v).
Each time is the mean over --passes calls after 10 warm-up calls; the ratio column divides by row 1 of its group.
First, FLOPs (torch's FlopCounterMode) of a generated frame: --steps one-frame passes and a commit, against --steps
window passes of cached + 1 frames (full attention, the recompute of benchmarks/rollout.py's row 1).
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
import torch._inductor.config
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from minisora.hardware import cpu_facts, cpu_model
from minisora.kv_cache import KVCache, KVRing
from minisora.model import VideoDiT


def mean_ms(fn, passes: int) -> float:
    for _ in range(10):
        fn()
    start = time.perf_counter()
    for _ in range(passes):
        fn()
    return (time.perf_counter() - start) / passes * 1e3


def filled(model: VideoDiT, cached: int, size: int) -> KVCache:
    cache = KVCache(len(model.blocks))
    model.commit(torch.randn(1, cached, 4, size, size), torch.zeros(1, cached), cache)
    return cache


def compiled_copy(model: VideoDiT) -> VideoDiT:
    """The same weights with compile_rollout (the model itself stays eager for the other rows)."""
    copy = VideoDiT.from_config(model.config).eval()
    copy.load_state_dict(model.state_dict())
    return copy.compile_rollout()


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def flop_line(model: VideoDiT, cached: int, steps: int) -> str:
    cache, x = filled(model, cached, 16), torch.randn(1, 1, 4, 16, 16)
    one = flops(lambda: model(x, torch.full((1, 1), 0.5), kv_cache=cache))
    commit = flops(lambda: model.commit(x, torch.zeros(1, 1), cache))
    full = VideoDiT.from_preset("tiny", in_channels=4, patch_size=2, attention="full")
    window = flops(lambda: full(torch.randn(1, cached + 1, 4, 16, 16), torch.full((1, cached + 1), 0.5)))
    per_frame = steps * one + commit
    return (f"GFLOP per generated frame: KV cache {per_frame / 1e9:.2f} ({steps} one-frame passes of "
            f"{one / 1e9:.3f} + a commit of {commit / 1e9:.3f}), window recompute {steps * window / 1e9:.2f} "
            f"({steps} passes of {window / 1e9:.3f}): {steps * window / per_frame:.1f}x fewer")


def rows(model: VideoDiT, cached: int, passes: int) -> tuple[list[tuple[str, float]], float]:
    """The table's (label, ms) rows, and the seconds the compiled passes took to compile."""
    out = []
    for size in (16, 2):
        cache, x, t = filled(model, cached, size), torch.randn(1, 1, 4, size, size), torch.full((1, 1), 0.5)
        tokens = (size // 2) ** 2
        out.append((f"one-frame pass, {tokens} token(s)/frame", mean_ms(lambda: model(x, t, kv_cache=cache), passes)))
    cache, x, t = filled(model, cached, 16), torch.randn(1, 1, 4, 16, 16), torch.zeros(1, 1)

    def commit():  # put the cache back after each commit, so every call sees --cached frames
        model.commit(x, t, cache)
        cache.keep_last(cached)

    def forward_commit():  # the same update by a whole committing forward (what rollouts did before commit)
        model(x, t, kv_cache=cache, update_cache=True)
        cache.keep_last(cached)

    out.append(("commit + keep_last, 64 tokens", mean_ms(commit, passes)))
    out.append(("forward(update_cache=True) + keep_last", mean_ms(forward_commit, passes)))
    ring, half = KVRing(filled(model, cached, 16), cached + 1), torch.full((1, 1), 0.5)
    compiled, start = compiled_copy(model), time.perf_counter()
    with torch._inductor.config.patch(fx_graph_cache=False):  # trace and lower again, not from the FX graph cache
        compiled(x, half, kv_cache=ring)
        compiled.commit(x, t, ring)
    compile_seconds = time.perf_counter() - start
    for label, net in (("eager", model), ("compiled", compiled)):
        out.append((f"one-frame pass on a KVRing, {label}", mean_ms(partial(net, x, half, kv_cache=ring), passes)))
        out.append((f"commit on a KVRing, {label}", mean_ms(partial(net.commit, x, t, ring), passes)))
    keys = (cached + 1) * 64
    q, k, v = torch.randn(1, 3, 64, 64), torch.randn(1, 3, keys, 64), torch.randn(1, 3, keys, 64)
    out.append(("attention: SDPA", mean_ms(lambda: F.scaled_dot_product_attention(q, k, v), passes)))
    out.append(("attention: math (q k^T, softmax, v)",
                mean_ms(lambda: ((q * 64 ** -0.5) @ k.transpose(-1, -2)).softmax(-1) @ v, passes)))
    return out, compile_seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2", help="Comma-separated torch CPU thread counts, one table each.")
    ap.add_argument("--cached", type=int, default=15, help="Clean frames in the KV cache (window 16, chunk 1: 15).")
    ap.add_argument("--steps", type=int, default=20, help="Euler steps per generated frame (the FLOP line).")
    ap.add_argument("--passes", type=int, default=200, help="Timed calls per row.")
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    model = VideoDiT.from_preset("tiny", in_channels=4, patch_size=2, attention="causal").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    print(f"{cpu_model()}, {cpu_facts().describe()}, torch {torch.__version__}")  # which machine the figures come from
    with torch.no_grad():
        print(flop_line(model, args.cached, args.steps))
    for threads in (int(n) for n in args.threads.split(",")):
        torch.set_num_threads(threads)
        print(f"\ntiny DiT, {args.cached} cached frames, fp32, cpu, {threads} thread(s)")
        print(f"{'row':<44}{'ms':>9}{'ratio':>8}")
        with torch.no_grad():
            table, compile_seconds = rows(model, args.cached, args.passes)
        for i, (label, ms) in enumerate(table):
            first = table[0][1] if i < 8 else table[8][1]  # the pass rows against row 1, the kernels against SDPA
            print(f"{label:<44}{ms:>9.2f}{ms / first:>8.2f}")
        print(f"compile of the KVRing pass and commit (first calls, FX graph cache off): {compile_seconds:.1f} s")


if __name__ == "__main__":
    main()
