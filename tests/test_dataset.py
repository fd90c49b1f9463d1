import json
import os
import time

import numpy as np
import pytest
import torch

from _store_helpers import make_store
from minisora.dataset import LatentWindows, ShardUse, WindowLoader, WindowSampler, sample_latents

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
    # one open shard: shard-major, each shard visited in one run; more open shards interleave them
    clips, _ = WindowSampler(LatentWindows(store[0], "train", 4, cache_shards=1), 2, seed=7).epoch_items(0)
    assert (np.diff(clips // 3) != 0).sum() == len(np.unique(clips // 3)) - 1
    clips, _ = a.epoch_items(0)
    assert (np.diff(clips // 3) != 0).sum() > len(np.unique(clips // 3)) - 1


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
    assert state == {"epoch": 1, "batch": 2, "cache_shards": 8}
    resumed = WindowLoader(s, state=state)
    rest = [next(resumed) for _ in range(3)]
    resumed.close()
    for x, y in zip(ref, first + rest):
        assert torch.equal(x.mean, y.mean) and torch.equal(x.clip, y.clip) and torch.equal(x.start, y.start)



def test_shard_uses_span_the_batches_that_need_their_shard(store):
    w = LatentWindows(store[0], "train", 4, cache_shards=2)
    s = WindowSampler(w, 2, seed=1)
    loader = WindowLoader(s)
    loader.close()
    n = s.batches_per_epoch()
    uses, it = [], loader._shard_uses(0, 1)  # from batch 1 of epoch 0 on
    while not uses or uses[-1].epoch < 2:
        uses.append(next(it))
    for epoch in (0, 1):
        needs = {b: set(w.shard_of(clips).tolist()) for b, clips, _ in s.batches(epoch, 1 if epoch == 0 else 0)}
        for b, need in needs.items():  # a batch's shards are all held ...
            assert need <= {u.shard for u in uses if u.epoch == epoch and u.first <= b <= u.last}, (epoch, b)
        for u in (u for u in uses if u.epoch == epoch):  # ... by a use that starts and ends where it is needed
            assert u.shard in needs[u.first] and u.shard in needs[u.last]
    assert min(u.first for u in uses if u.epoch == 0) == 1 and max(u.last for u in uses if u.epoch == 0) == n - 1
    use = ShardUse(epoch=1, shard=2, first=1, last=3)
    assert use.starts_after(1, 0) and use.starts_after(0, 3) and not use.starts_after(1, 1)
    assert use.ends_at(1, 3) and not use.ends_at(1, 1) and not use.ends_at(2, 3)

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


# ---------------------------------------------------------------------- shards dealt to ranks
COVER = {"train": [5, 9, 2, 7, 7, 3, 8, 6, 12, 4, 9, 9, 1, 6, 7, 8, 5, 10, 6, 7, 3, 11, 8, 6, 9, 4, 7]}


@pytest.fixture(scope="module")
def cover_store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("c") / "store", COVER, clips_per_shard=3, hw=(2, 2))[0]


def _read_ahead(s, epoch, batches, readahead):
    """Shards a loader may have read from `epoch` on once it assembled `batches` of it: those plus `readahead` more."""
    opening, used = [], 0  # shard uses in first-use order; short epochs: read-ahead runs into later ones
    for e in (epoch, epoch + 1, epoch + 2):
        ks = s.rank_epoch(e).clips // 3
        used = used or len(np.unique(ks[:batches * s.batch_size]))
        opening += ks[np.sort(np.unique(ks, return_index=True)[1])].tolist()
    return set(opening[:used + readahead])


@pytest.mark.parametrize("world,batch", [(1, 4), (2, 3), (3, 2), (4, 2)])
def test_ranks_read_own_shards_and_cover_every_usable_clip_once(cover_store, world, batch):
    usable = [i for i, n in enumerate(COVER["train"]) if n >= 4]  # 23 clips in 9 shards
    for epoch in (0, 1):
        got, reads = [], []
        for rank in range(world):
            w = LatentWindows(cover_store, "train", 4, cache_shards=2)
            s = WindowSampler(w, batch, seed=5, rank=rank, world=world)
            plan = s.rank_epoch(epoch)
            loader = WindowLoader(s, state={"epoch": epoch, "batch": 0, "cache_shards": 2}, prefetch=1)
            batches = [next(loader) for _ in range(s.batches_per_epoch())]
            loader.close()
            delivered = torch.cat([b.clip for b in batches]).numpy()
            np.testing.assert_array_equal(delivered, plan.clips)  # the loader delivers the plan
            assert len(delivered) == len(usable) // (world * batch) * batch  # same steps on every rank
            own = set(plan.shards.tolist())
            ahead = _read_ahead(s, epoch + 1, 2, loader.readahead)  # 1 batch queued, 1 being assembled
            read = set(w.shard_reads)
            assert set((delivered // 3).tolist()) <= read & own and read <= own | ahead  # only its own shards
            assert all(n == 1 or k in ahead for k, n in w.shard_reads.items())  # each read once per epoch
            # edge rule: the surplus is the tail of the rank's order, the deficit repeats its last clips
            assert not (set(plan.dropped.tolist()) & set(delivered.tolist()))
            if len(plan.repeated):
                d = len(plan.repeated)
                np.testing.assert_array_equal(plan.repeated, delivered[len(delivered) - 2 * d:len(delivered) - d])
            # largest shard first to the least-loaded rank: a deficit of at most one shard (3 clips),
            # a surplus below one shard plus the global remainder of under one batch
            assert len(plan.repeated) <= 3 and len(plan.dropped) < 3 + batch
            got.append((delivered, plan))
            reads.append(read & own)
        assert all(not (a & b) for i, a in enumerate(reads) for b in reads[i + 1:])  # no shard read by two ranks
        counts = np.bincount(np.concatenate([d for d, _ in got]), minlength=len(COVER["train"]))
        dropped = np.concatenate([p.dropped for _, p in got]).astype(np.int64)
        repeated = np.concatenate([p.repeated for _, p in got]).astype(np.int64)
        expect = np.zeros(len(COVER["train"]), np.int64)
        expect[usable] = 1
        np.subtract.at(expect, dropped, 1)
        np.add.at(expect, repeated, 1)
        np.testing.assert_array_equal(counts, expect)  # every usable clip once, up to the edge rule
        assert len(dropped) - len(repeated) == len(usable) - world * (len(usable) // (world * batch)) * batch


def test_dealing_changes_each_epoch_and_batches_mix_shards(cover_store):
    w = LatentWindows(cover_store, "train", 4, cache_shards=3)
    s = WindowSampler(w, 4, seed=0, rank=0, world=2)
    assert [d.tolist() for d in s.deal(0)] != [d.tolist() for d in s.deal(1)]
    clips = s.rank_epoch(0).clips
    per_batch = [len(np.unique(clips[i:i + 4] // 3)) for i in range(0, len(clips), 4)]
    assert max(per_batch) >= 2  # a batch draws from several open shards


def test_fewer_shards_than_ranks_is_refused(cover_store):
    w = LatentWindows(cover_store, "train", 4)
    with pytest.raises(ValueError, match="9 shards of train hold clips of >= 4 latent frames, fewer than the 16 ranks"):
        WindowSampler(w, 1, world=16)


def test_resume_with_other_cache_shards_is_refused(cover_store):
    s = WindowSampler(LatentWindows(cover_store, "train", 4, cache_shards=4), 2)
    with pytest.raises(ValueError, match="mixed 2 open shards per rank; this run has --cache-shards 4"):
        WindowLoader(s, state={"epoch": 0, "batch": 1, "cache_shards": 2})


def test_loader_reads_shards_before_the_batches_that_need_them(cover_store):
    w = LatentWindows(cover_store, "train", 4, cache_shards=1)  # shard-major: each shard needed late
    s = WindowSampler(w, 2, seed=3)
    loader = WindowLoader(s, prefetch=1, readahead=2)
    next(loader)  # batch 0 delivered: at most batches 1 (queued) and 2 (being put) are assembled
    ks = s.rank_epoch(0).clips // 3
    opening = ks[np.sort(np.unique(ks, return_index=True)[1])].tolist()
    assembled = len(np.unique(ks[:3 * 2]))
    ahead = set(opening[assembled:assembled + 2])  # needed by no assembled batch
    deadline = time.time() + 60
    while not ahead <= set(w.shard_reads) and time.time() < deadline:
        time.sleep(0.01)
    loader.close()
    assert len(ahead) == 2 and ahead <= set(w.shard_reads)


def test_loader_holds_a_bounded_number_of_shards(cover_store):
    w = LatentWindows(cover_store, "train", 4, cache_shards=2)
    loader = WindowLoader(WindowSampler(w, 2, seed=1), readahead=1)
    for _ in range(30):  # three epochs
        next(loader)
    loader.close()
    assert 2 <= loader.peak_resident <= 2 + 1 + 2  # open shards + read-ahead + those closing in the batch
    assert sum(w.shard_reads.values()) <= 3 * 9 + 2  # about one read per shard per epoch


# ---------------------------------------------------------------------- verified bytes only
def _corrupt(store, how):
    lay = store.layout("train")
    k = 1
    marker = store._marker_path("train", k)
    path = f"{store.root}/{store._shard_key('train', 'mean', k)}"
    if how == "flip":
        data = bytearray(open(path, "rb").read())
        data[len(data) // 3] ^= 0x10
        open(path, "wb").write(bytes(data))
    elif how == "truncate":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    elif how == "no-marker":
        os.remove(marker)
    elif how == "bad-json":
        open(marker, "w").write("{not json")
    elif how == "wrong-lengths":
        c = json.load(open(marker))
        c["lengths"][0] = 5
        json.dump(c, open(marker, "w"))
    elif how == "wrong-checksum":
        c = json.load(open(marker))
        c["checksums"]["mean"] = "0" * 64
        json.dump(c, open(marker, "w"))
    return k, lay, path, marker


@pytest.mark.parametrize("how,what", [("flip", "checksum mismatch in {path}"),
                                      ("truncate", "checksum mismatch in {path}"),
                                      ("no-marker", "has no commit marker ({marker})"),
                                      ("bad-json", "commit marker {marker} is unreadable"),
                                      ("wrong-checksum", "checksum mismatch in {path}"),
                                      ("wrong-lengths", "commit marker {marker} does not describe clips [2, 4)")])
def test_a_shard_without_valid_marker_or_bytes_is_never_trained_on(tmp_path, how, what):
    from minisora.store import StoreError

    st, _ = make_store(tmp_path / "store", {"train": [6] * 6}, clips_per_shard=2)
    k, _, path, marker = _corrupt(st, how)
    w = LatentWindows(str(tmp_path / "store"), "train", 4, cache_shards=1)
    loader = WindowLoader(WindowSampler(w, 2, seed=0), readahead=1)  # shard-major: one shard per batch
    with pytest.raises(StoreError) as e:
        for _ in range(3):
            b = next(loader)
            assert not (b.clip // 2 == k).any()  # no window of the bad shard is ever delivered
    loader.close()
    msg = str(e.value)
    assert str(tmp_path / "store") in msg and f"train shard {k}" in msg and what.format(path=path, marker=marker) in msg
    assert f"run `minisora store verify {tmp_path / 'store'}`" in msg
    assert k not in w.shard_reads  # counted only once checked


@pytest.mark.gpu
def test_batches_are_pinned_for_cuda(cover_store):
    w = LatentWindows(cover_store, "train", 4)
    loader = WindowLoader(WindowSampler(w, 2), pin_memory=True)
    b = next(loader)
    loader.close()
    assert b.mean.is_pinned() and b.logvar.is_pinned() and b.actions.is_pinned()
    g = b.to("cuda")
    assert g.mean.device.type == "cuda" and torch.equal(g.mean.cpu(), b.mean)


@pytest.mark.parametrize("how,what", [("truncate", "checksum mismatch in {path}"),
                                      ("no-marker", "has no commit marker ({marker})")])
def test_train_stops_with_one_line_naming_the_bad_shard(tmp_path, how, what):
    from typer.testing import CliRunner

    from cli.main import app

    st, _ = make_store(tmp_path / "store", {"train": [6] * 6, "test": [6]}, clips_per_shard=2)
    k, _, path, marker = _corrupt(st, how)
    r = CliRunner().invoke(app, ["train", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "run"),
                                 "--frames", "4", "--batch-size", "2", "--steps", "6", "--ckpt-every", "0",
                                 "--cache-shards", "1", "--log-every", "1"])
    assert r.exit_code == 1
    assert f"error: {tmp_path / 'store'}: train shard {k}" in r.output
    assert what.format(path=path, marker=marker) in r.output
    assert f"run `minisora store verify {tmp_path / 'store'}`" in r.output and "Traceback" not in r.output
