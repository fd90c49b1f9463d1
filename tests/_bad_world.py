"""The shared world of the bad-input suite: small clips, two VAEs, a store of each, a short run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from minisora.data.manifest import build_manifest
from minisora.data.synthetic import write_synthetic_dataset
from minisora.vae import build_vae, tiny_vae_config


@dataclass
class World:
    base: Path
    data: Path  # synthetic DMLab root: 3 train + 1 test clips of 9 frames
    manifest: str
    vae: str  # tiny random AutoencoderKL
    vae2: str  # the same config, other weights
    store: str  # encoded with vae at 16x16, 2 clips per shard
    store2: str  # the same clips, encoded with vae2
    run: str  # 2 training steps on store (window 4), checkpoint at step 2


def build_world(base: Path) -> World:
    from stages.encode import EncodeConfig, main as encode_main
    from stages.train import TrainConfig, main as train_main

    write_synthetic_dataset("dmlab", base / "data", clips=3, test_clips=1, frames=9, seed=0, progress=False)
    manifest, _ = build_manifest(base / "data", "dmlab")
    manifest.save(base / "manifest.json")
    for seed, name in ((0, "vae"), (1, "vae2")):
        torch.manual_seed(seed)
        build_vae("kl", tiny_vae_config("kl")).model.save_pretrained(base / name)
        store = "store" if name == "vae" else "store2"
        encode_main(
            EncodeConfig(
                manifest=str(base / "manifest.json"),
                vae=str(base / name),
                out=str(base / store),
                size=16,
                clips_per_shard=2,
                progress=False,
                device="cpu",
            )
        )
    train_main(
        TrainConfig(
            store=str(base / "store"),
            out=str(base / "run"),
            frames=4,
            batch_size=2,
            steps=2,
            warmup=1,
            ckpt_every=2,
            log_every=1,
            device="cpu",
        )
    )
    return World(
        base,
        base / "data",
        str(base / "manifest.json"),
        str(base / "vae"),
        str(base / "vae2"),
        str(base / "store"),
        str(base / "store2"),
        str(base / "run"),
    )


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
