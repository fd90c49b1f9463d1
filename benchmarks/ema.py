"""EMA update time: a Python loop of lerp_ per parameter (minisora before issue 11) against minisora.ema's one
fused torch._foreach_lerp_, side by side in one run, on the DiT presets' real parameter lists.

    python benchmarks/ema.py [--presets tiny,small] [--repeats 20] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

from minisora.ema import EMA
from minisora.model import DIT_MODEL_SPECS, VideoDiT


def loop_update(shadow: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            shadow[name].lerp_(p.detach().float(), 1.0 - decay)


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,small", help=f"comma-separated, from {', '.join(DIT_MODEL_SPECS)}")
    ap.add_argument("--repeats", type=int, default=20, help="timed updates per method (the best is reported)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{name}, fp32 parameters, best of {args.repeats}")
    print(f"{'preset':<8}{'params':>9}{'tensors':>9}{'loop ms':>10}{'foreach ms':>12}{'speed-up':>10}")
    for preset in args.presets.split(","):
        model = VideoDiT.from_preset(preset, in_channels=4, patch_size=2).to(device)
        shadow = {k: v.detach().float().clone() for k, v in model.named_parameters()}
        ema = EMA.of(model, 0.999)
        loop = timed(lambda: loop_update(shadow, model, 0.999), args.repeats, device)
        fused = timed(lambda: ema.update(model), args.repeats, device)
        n = sum(p.numel() for p in model.parameters())
        print(f"{preset:<8}{n / 1e6:>8.1f}M{len(ema.shadow):>9}{loop * 1e3:>10.2f}{fused * 1e3:>12.2f}"
              f"{loop / fused:>9.2f}x")


if __name__ == "__main__":
    main()
