"""Stage one throughput: the bare VAE against the whole `encode` pipeline, on the same frames, in one run.

    python benchmarks/encode.py [--clips 4] [--frames 300] [--vaes demo,w32] [--repeats 3] [--threads 1]

For each VAE configuration:

1. bare VAE: every frame already read and decoded, each clip turned into (resized) pixels outside the
   clock; only `VideoVAE.encode` is timed, in batches of `--batch-size` frames (what the stage feeds it)
2. full `encode` (stages.encode.main): read the npz, inflate, resize, VAE, write fp16 shards with
   zstd, checksum and commit. "loop" times the shard loop (the stage's own clock); "end to end" also
   counts loading the VAE, creating the store and finalising its statistics.

The ratio full/bare says how much of the VAE's rate the pipeline keeps: reading, decoding and
writing run in threads (`--read-workers`, one writer) beside the VAE. Data: synthetic DMLab
clips of 300 frames at 64x64 (`minisora.data.synthetic`), written once under --data and reused.

VAE configurations (random weights: the cost of a forward pass does not depend on them):
    demo   the project's own VAE (`minisora vae train` default): AutoencoderKL (16, 32, 64), 4x, 0.68M params, 64x64
    w32    the same at width 32: (32, 64, 128), 2.7M params, 64x64
    sd     SD-like: AutoencoderKL (64, 128, 256, 256), 2 layers per block, 8x, 21M params, frames resized to 128x128
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

VAES = {
    "demo": dict(kind="kl", size=None, config=dict(latent_channels=4, downsample=4, width=16)),
    "w32": dict(kind="kl", size=None, config=dict(latent_channels=4, downsample=4, width=32)),
    "sd": dict(kind="kl", size=128, config=None),  # built below: SD's block layout at full width
}


def sd_like_config() -> dict:
    return dict(in_channels=3, out_channels=3, latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[64, 128, 256, 256], layers_per_block=2,
                norm_num_groups=32, sample_size=128, scaling_factor=1.0)


def make_data(data: Path, clips: int, frames: int) -> Path:
    from minisora.data.manifest import build_manifest
    from minisora.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset("dmlab", data, clips=clips, frames=frames, seed=0, workers=1, progress=True)
    manifest, _ = build_manifest(data, "dmlab")
    manifest.clips = [c for c in manifest.clips if c.split == "train"][:clips]
    path = data / f"manifest-{clips}x{frames}.json"
    manifest.save(path)
    return path


def make_vae(name: str, out: Path) -> tuple[Path, int | None, int]:
    from minisora.vae import build_vae, tiny_vae_config

    spec = VAES[name]
    config = sd_like_config() if spec["config"] is None else tiny_vae_config(spec["kind"], **spec["config"])
    torch.manual_seed(0)
    vae = build_vae(spec["kind"], config)
    vae.model.save_pretrained(out / name)
    return out / name, spec["size"], sum(p.numel() for p in vae.model.parameters())


def bare_vae_rate(vae_dir: Path, manifest_path: Path, size: int | None, batch_size: int, device: str) -> float:
    """Frames/s of VideoVAE.encode alone on every manifest frame: clips are read beforehand, and each clip's
    pixels are made (and resized) outside the clock right before its VAE calls, so only the VAE is timed."""
    import torch.nn.functional as F

    from minisora.data.clips import read_clip
    from minisora.data.manifest import Manifest
    from minisora.vae import VideoVAE, frames_to_pixels

    manifest = Manifest.load(manifest_path)
    vae = VideoVAE.load(str(vae_dir), device=device)
    clips = [read_clip(manifest.abspath(c), manifest.kind)[0] for c in manifest.clips]  # uint8 (T, H, W, 3)
    seconds, frames = 0.0, 0
    for j, clip in enumerate([clips[0]] + clips):  # the first pass over clip 0 warms up
        pixels = frames_to_pixels(torch.from_numpy(clip).to(device))  # (T, 3, H, W)
        if size:
            pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        _sync(device)
        t0 = time.perf_counter()
        for i in range(0, len(pixels), batch_size):
            vae.encode(pixels[i:i + batch_size][None])[0].cpu()  # the stage copies latents back too
        _sync(device)
        if j > 0:
            seconds += time.perf_counter() - t0
            frames += len(pixels)
    return frames / seconds


def full_encode_rate(vae_dir: Path, manifest_path: Path, size: int | None, batch_size: int, device: str,
                     read_workers: int, out: Path) -> tuple[float, float]:
    """(loop frames/s, end-to-end frames/s) of stages.encode.main into a fresh store."""
    from stages.encode import EncodeConfig, main

    cfg = EncodeConfig(manifest=str(manifest_path), vae=str(vae_dir), out=str(out), size=size, batch_size=batch_size,
                       device=device, overwrite=True, progress=False, read_workers=read_workers, splits=("train",))
    t0 = time.perf_counter()
    summary = main(cfg)
    total = time.perf_counter() - t0
    return summary["rank_frames"] / summary["seconds"], summary["rank_frames"] / total


def _r(rate: float) -> str:
    return f"{rate:.0f}" if rate >= 100 else f"{rate:.1f}"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--vaes", default="demo,w32", help=f"comma-separated, of {', '.join(VAES)}")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--read-workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3,
                    help="alternate bare and full this many times; the best of each is reported")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads [default: torch's choice]")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "minisora-bench-encode",
                    help="where the synthetic clips are written once and reused")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as the minisora CLI does, so that both sides compute alike

    manifest_path = make_data(args.data, args.clips, args.frames)
    print(f"data: {args.clips} synthetic DMLab clips x {args.frames} frames, 64x64 ({args.data}); "
          f"device {args.device}, "
          f"torch threads {torch.get_num_threads()}, batch {args.batch_size}, read workers {args.read_workers}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.vaes.split(","):
            vae_dir, size, params = make_vae(name, Path(tmp))
            bare, loop, e2e = [], [], []
            for r in range(args.repeats):
                bare.append(bare_vae_rate(vae_dir, manifest_path, size, args.batch_size, args.device))
                lp, ee = full_encode_rate(vae_dir, manifest_path, size, args.batch_size, args.device, args.read_workers,
                                          Path(tmp) / f"store-{name}")
                loop.append(lp)
                e2e.append(ee)
                print(f"  {name} run {r + 1}: bare {_r(bare[-1])}, encode loop {_r(lp)}, end to end {_r(ee)} frames/s",
                      flush=True)
            b, lp, ee = (max(x) for x in (bare, loop, e2e))  # best of: other load only ever slows a run down
            rows.append((name, f"{params / 1e6:.2f}M", f"{size or 64}x{size or 64}", b, lp, ee))

    print()
    print("| VAE  | params | frames  | bare VAE frames/s | encode loop frames/s | loop / bare | end to end frames/s | "
          "e2e / bare |")
    print("|------|--------|---------|-------------------|----------------------|-------------|---------------------|"
          "------------|")
    for name, params, res, b, lp, ee in rows:
        print(f"| {name:<4} | {params:>6} | {res:<7} | {_r(b):>17} | {_r(lp):>20} | {lp / b:10.0%} | {_r(ee):>19} | "
              f"{ee / b:9.0%} |")


if __name__ == "__main__":
    main()
