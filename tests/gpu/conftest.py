"""Fixtures of the GPU tests: a tiny latent store and a tiny encoded dataset (all marked `gpu` in their files)."""

import pytest

from _store_helpers import make_store, synthetic_clips


@pytest.fixture(scope="session")
def gpu_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu") / "store"
    make_store(path, {"train": [8] * 8, "test": [8] * 2}, clips_per_shard=4, hw=(8, 8))
    return str(path)


@pytest.fixture(scope="session")
def clips(tmp_path_factory):
    """4 train + 1 test synthetic DMLab clips of 16 frames, their manifest and a tiny random KL VAE."""
    return synthetic_clips(tmp_path_factory.mktemp("clips"), clips=4, test_clips=1, frames=16)
