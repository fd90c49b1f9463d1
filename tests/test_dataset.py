import numpy as np
import pytest
import torch

from _store_helpers import make_store
from minisora.dataset import LatentWindows, WindowLoader, WindowSampler, sample_latents

LENGTHS = {"train": [10, 12, 5, 20, 3, 15, 8, 9, 11, 7], "test": [6, 6]}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("s") / "store", LENGTHS, clips_per_shard=3)


def test_windows_match_store_and_never_cross_padding(store):
    st, data = store
    w = LatentWindows(st, "train", 6)
    assert w.usable.tolist() == [i for i, n in enumerate(LENGTHS["train"]) if n >= 6]
    s = WindowSampler(w, batch_size=2, seed=3)
    mean, logvar, actions = data["train"]
    seen = 0
    for epoch in range(5):
        for _, clips, starts in s.batches(epoch):
            b = w.read(clips, starts)
            assert b.mean.shape == (2, 6, 4, 4, 4) and b.mean.dtype == torch.float16
            assert torch.isfinite(b.mean).all() and torch.isfinite(b.logvar).all()  # never into NaN padding
            for j, (c, t0) in enumerate(zip(clips, starts)):
                assert t0 + 6 <= LENGTHS["train"][c]
                np.testing.assert_array_equal(b.mean[j].numpy(), mean[c, t0:t0 + 6])
                np.testing.assert_array_equal(b.logvar[j].numpy(), logvar[c, t0:t0 + 6])
                np.testing.assert_array_equal(b.actions[j].numpy(), actions[c, t0:t0 + 6])
            seen += 1
    assert seen == 5 * (len(w.usable) // 2)


def test_reading_into_padding_is_refused(store):
    w = LatentWindows(store[0], "train", 6)
    with pytest.raises(IndexError, match="window \\[0, 6\\) of clip 2 leaves its 5 latent frames"):
        w.read(np.array([2]), np.array([0]))


def test_sampler_deterministic_and_rank_split(store):
    w = LatentWindows(store[0], "train", 4)
    a, b = WindowSampler(w, 2, seed=7), WindowSampler(w, 2, seed=7)
    for e in range(3):
        np.testing.assert_array_equal(a.epoch_items(e)[0], b.epoch_items(e)[0])
        np.testing.assert_array_equal(a.epoch_items(e)[1], b.epoch_items(e)[1])
    assert not np.array_equal(a.epoch_items(0)[1], a.epoch_items(1)[1])
    # every usable clip once per epoch (before cutting to whole batches), shard-major
    r0, r1 = WindowSampler(w, 2, seed=7, rank=0, world=2), WindowSampler(w, 2, seed=7, rank=1, world=2)
    c0 = np.concatenate([c for _, c, _ in r0.batches(0)])
    c1 = np.concatenate([c for _, c, _ in r1.batches(0)])
    assert len(c0) == len(c1) == 4 and not set(c0) & set(c1)
    clips, _ = a.epoch_items(0)
    shards = clips // 3
    assert (np.diff(shards) != 0).sum() == len(np.unique(shards)) - 1  # each shard visited in one run


def test_loader_resumes_mid_epoch(store):
    w = LatentWindows(store[0], "train", 4)
    s = WindowSampler(w, 2, seed=1)
    loader = WindowLoader(s)
    ref = [next(loader) for _ in range(9)]  # crosses an epoch boundary (4 batches per epoch)
    loader.close()
    loader = WindowLoader(s)
    first = [next(loader) for _ in range(6)]
    state = loader.state_dict()
    loader.close()
    assert state == {"epoch": 1, "batch": 2}
    resumed = WindowLoader(s, state=state)
    rest = [next(resumed) for _ in range(3)]
    resumed.close()
    for x, y in zip(ref, first + rest):
        assert torch.equal(x.mean, y.mean) and torch.equal(x.clip, y.clip) and torch.equal(x.start, y.start)


def test_sample_latents_normalises_with_store_stats(store):
    st, _ = store
    w = LatentWindows(st, "train", 4)
    s = WindowSampler(w, 7, seed=0)
    clips, starts = s.epoch_items(0)
    b = w.read(clips, starts)
    g = torch.Generator().manual_seed(0)
    z = torch.cat([sample_latents(b, w.stats_mean, w.stats_std, g) for _ in range(200)])
    # normalised posterior samples: per-channel mean ~0, std ~1 (stats are over all frames, windows are a subset)
    assert z.mean(dim=(0, 1, 3, 4)).abs().max() < 0.25
    assert (z.std(dim=(0, 1, 3, 4)) - 1).abs().max() < 0.25
    z1, z2 = sample_latents(b, w.stats_mean, w.stats_std, g), sample_latents(b, w.stats_mean, w.stats_std, g)
    assert not torch.equal(z1, z2)  # a fresh sample per read
    det = sample_latents(type(b)(b.mean, None, b.actions, b.clip, b.start), w.stats_mean, w.stats_std)
    expect = (b.mean.float() - w.stats_mean.view(1, 1, -1, 1, 1)) / w.stats_std.view(1, 1, -1, 1, 1)
    assert torch.allclose(det, expect)
