"""Build small latent stores for tests: straight from arrays (no VAE), or encoded from synthetic clips."""

from __future__ import annotations

import json

from pathlib import Path

import numpy as np

from minisora.store import LatentStore, SplitLayout


def make_store(url, lengths: dict[str, list[int]], channels=4, hw=(4, 4), clips_per_shard=2, seed=0,
               deterministic=False, num_actions=3, chunk_checksum=True):
    """A complete store whose latents are random; returns (store, {split: (mean, logvar, actions)})."""
    rng = np.random.default_rng(seed)
    layouts, data, clips = {}, {}, []
    for split, lens in lengths.items():
        t = max(lens)
        layouts[split] = SplitLayout(len(lens), t, channels, hw[0], hw[1], clips_per_shard)
        mean = np.full((len(lens), t, channels) + hw, np.nan, np.float16)
        logvar = np.full_like(mean, np.nan)
        actions = np.full((len(lens), t), -1, np.int16)
        for i, n in enumerate(lens):
            mean[i, :n] = rng.normal(size=(n, channels) + hw) * 2 + 1
            logvar[i, :n] = rng.normal(size=(n, channels) + hw) - 3
            actions[i, :n] = rng.integers(0, num_actions, n)
        data[split] = (mean, None if deterministic else logvar, actions)
        clips += [{"split": split, "path": f"{split}/{i:05d}.npz"} for i in range(len(lens))]
    attrs = {"vae": {"class_name": "test", "temporal_compression": 1},
             "source": {"kind": "dmlab", "resolution": [16, 16]}}
    store = LatentStore.create(str(url), attrs, layouts, deterministic, json.dumps({"kind": "dmlab", "clips": clips}),
                               chunk_checksum=chunk_checksum)
    for split, lay in layouts.items():
        mean, logvar, actions = data[split]
        lens = np.array(lengths[split])
        for k in range(lay.num_shards):
            lo, hi = lay.shard_range(k)
            store.write_shard(split, k, mean[lo:hi], None if logvar is None else logvar[lo:hi], actions[lo:hi],
                              lens[lo:hi], [f"{split}/{i:05d}.npz" for i in range(lo, hi)], [])
    store.finalize()
    return store, data


def synthetic_clips(root, clips: int, test_clips: int, frames: int = 12) -> Path:
    """ROOT/data: synthetic DMLab clips (seed 0), ROOT/manifest.json and ROOT/vae: a tiny random AutoencoderKL
    (torch seed 0). Returns ROOT."""
    import torch

    from minisora.data.manifest import build_manifest
    from minisora.data.synthetic import write_synthetic_dataset
    from minisora.vae import build_vae, tiny_vae_config

    root = Path(root)
    write_synthetic_dataset("dmlab", root / "data", clips=clips, test_clips=test_clips, frames=frames, seed=0,
                            progress=False)
    manifest, _ = build_manifest(root / "data", "dmlab")
    manifest.save(root / "manifest.json")
    torch.manual_seed(0)
    build_vae("kl", tiny_vae_config("kl")).model.save_pretrained(root / "vae")
    return root


def synthetic_store(root, clips: int, test_clips: int, frames: int = 12) -> None:
    """`synthetic_clips`, and ROOT/store: every clip encoded at 16x16, 2 clips per shard."""
    from stages.encode import EncodeConfig, main as encode_main

    root = synthetic_clips(root, clips, test_clips, frames)
    encode_main(EncodeConfig(manifest=str(root / "manifest.json"), vae=str(root / "vae"), out=str(root / "store"),
                             size=16, clips_per_shard=2, progress=False, device="cpu"))


def store_arrays(url) -> dict[str, np.ndarray]:
    """Every array of every split of the store at `url`, by "split/name"."""
    st = LatentStore(url)
    return {f"{s}/{n}": st.array(s, n)[:] for s in st.splits for n in st.array_names()}


def store_markers(url) -> dict[str, dict]:
    """Every shard's commit marker of the store at `url`, by "split/shard"."""
    st = LatentStore(url)
    return {f"{s}/{k}": st.read_commit(s, k).__dict__ for s in st.splits for k in range(st.layout(s).num_shards)}
