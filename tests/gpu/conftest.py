"""Fixtures of the GPU tests: a tiny latent store and a tiny encoded dataset (all marked `gpu` in their files)."""

import pytest
import torch

from _store_helpers import make_store


@pytest.fixture(scope="session")
def gpu_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu") / "store"
    make_store(path, {"train": [8] * 8, "test": [8] * 2}, clips_per_shard=4, hw=(8, 8))
    return str(path)


@pytest.fixture(scope="session")
def clips(tmp_path_factory):
    """4 train + 1 test synthetic DMLab clips of 16 frames, their manifest and a tiny random KL VAE."""
    from minisora.data.manifest import build_manifest
    from minisora.data.synthetic import write_synthetic_dataset
    from minisora.vae import build_vae, tiny_vae_config

    root = tmp_path_factory.mktemp("clips")
    write_synthetic_dataset("dmlab", root / "data", clips=4, test_clips=1, frames=16, seed=0, progress=False)
    manifest, _ = build_manifest(root / "data", "dmlab")
    manifest.save(root / "manifest.json")
    torch.manual_seed(0)
    build_vae("AutoencoderKL", tiny_vae_config("kl")).model.save_pretrained(root / "vae")
    return root
