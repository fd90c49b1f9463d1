import json
import os

import numpy as np
import pytest

from _store_helpers import make_store
from minisora.store import LatentStore, SplitLayout, StoreError


LENGTHS = {"train": [5, 8, 3, 8, 6], "test": [4, 8]}


def _valid(arr, lengths):
    return np.concatenate([arr[i, :n] for i, n in enumerate(lengths)]).astype(np.float64)


def test_round_trip_arrays_padding_and_stats(tmp_path):
    store, data = make_store(tmp_path / "s", LENGTHS)
    st = LatentStore(tmp_path / "s")
    for split, (mean, logvar, actions) in data.items():
        np.testing.assert_array_equal(st.array(split, "mean")[:], mean)
        np.testing.assert_array_equal(st.array(split, "logvar")[:], logvar)
        np.testing.assert_array_equal(st.array(split, "actions")[:], actions)
        assert st.array(split, "length")[:].tolist() == LENGTHS[split]
    mean, logvar, _ = data["train"]
    m, lv = _valid(mean, LENGTHS["train"]), _valid(logvar, LENGTHS["train"])
    mu = m.mean(axis=(0, 2, 3))
    std = np.sqrt((m**2 + np.exp(lv)).mean(axis=(0, 2, 3)) - mu**2)
    stats = st.attrs["latent_stats"]
    np.testing.assert_allclose(stats["mean"], mu, rtol=1e-9)
    np.testing.assert_allclose(stats["std"], std, rtol=1e-9)
    assert st.attrs["complete"] and st.attrs["num_actions"] == 3
    assert st.verify() == []


def test_one_file_per_array_per_shard(tmp_path):
    make_store(tmp_path / "s", LENGTHS, clips_per_shard=2)
    files = sorted(os.listdir(tmp_path / "s" / "train" / "mean" / "c"))
    assert files == ["0", "1", "2"]  # 5 clips, 2 per shard
    markers = sorted(os.listdir(tmp_path / "s" / "train" / "_commits"))
    assert markers == ["shard-00000.json", "shard-00001.json", "shard-00002.json"]


def test_verify_catches_flipped_byte(tmp_path):
    make_store(tmp_path / "s", LENGTHS)
    path = tmp_path / "s" / "train" / "mean" / "c" / "1" / "0" / "0" / "0" / "0"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    problems = LatentStore(tmp_path / "s").verify()
    assert len(problems) == 1 and "train shard 1" in problems[0] and "checksum mismatch" in problems[0]


def test_verify_catches_missing_shard_and_truncation(tmp_path):
    make_store(tmp_path / "s", LENGTHS)
    (tmp_path / "s" / "test" / "_commits" / "shard-00000.json").unlink()
    f = tmp_path / "s" / "train" / "actions" / "c" / "2" / "0"
    f.write_bytes(f.read_bytes()[:5])
    problems = LatentStore(tmp_path / "s").verify()
    assert any("shard 0 of test is not committed" in p for p in problems)
    assert any("train shard 2" in p and "checksum mismatch" in p for p in problems)
    (tmp_path / "s" / "train" / "logvar" / "c" / "0" / "0" / "0" / "0" / "0").unlink()
    problems = LatentStore(tmp_path / "s").verify()
    assert any("train shard 0" in p and "is missing" in p for p in problems)


def test_verify_catches_data_in_padding_with_valid_checksums(tmp_path):
    store, _ = make_store(tmp_path / "s", LENGTHS)
    # rewrite shard 0 with a non-NaN padding frame: checksums are recomputed, padding check must fire
    mean = store.array("train", "mean")[0:2]
    mean[0, 6] = 0.0  # clip 0 has 5 frames
    c = store.read_commit("train", 0)
    store.write_shard("train", 0, mean, store.array("train", "logvar")[0:2], store.array("train", "actions")[0:2],
                      np.array(c.lengths), c.keys, [])
    problems = LatentStore(tmp_path / "s").verify()
    assert problems == ["train shard 0: clip 0 (train/00000.npz) padding past frame 5 is not NaN"]


def test_incomplete_store_refused_and_not_a_store(tmp_path):
    lay = {"train": SplitLayout(2, 3, 4, 2, 2, 1)}
    st = LatentStore.create(str(tmp_path / "s"), {"vae": {}, "source": {}}, lay, False, json.dumps({"clips": []}))
    with pytest.raises(StoreError, match="incomplete"):
        LatentStore(tmp_path / "s").require_complete()
    with pytest.raises(StoreError, match="cannot finalize, uncommitted shards: train: \\[0, 1\\]"):
        st.finalize()
    with pytest.raises(StoreError, match="not a latent store"):
        LatentStore(tmp_path / "nothing")


def test_memory_url_store(tmp_path):
    store, data = make_store("memory://minisora-test-store", LENGTHS, deterministic=True)
    st = LatentStore("memory://minisora-test-store")
    assert st.verify() == []
    assert "logvar" not in st.array_names()
    np.testing.assert_array_equal(st.array("test", "mean")[:], data["test"][0])
    info = st.info()
    assert info["splits"]["train"]["latent_frames"] == sum(LENGTHS["train"])
    assert info["bytes"] > 0


def test_reopened_store_writes_all_padding_shard_and_replaces_torn_files(tmp_path):
    lay = {"train": SplitLayout(2, 3, 4, 2, 2, 1)}
    LatentStore.create(str(tmp_path / "s"), {"vae": {}, "source": {}}, lay, False,
                       json.dumps({"clips": [{"split": "train", "path": "train/a.npz"},
                                             {"split": "train", "path": "train/b.npz"}]}))
    st = LatentStore(tmp_path / "s", mode="a")  # reopened, as a resumed encode does
    torn = tmp_path / "s" / "train" / "mean" / "c" / "0" / "0" / "0" / "0" / "0"
    torn.parent.mkdir(parents=True)
    torn.write_bytes(b"half a shard")  # what a kill -9 mid-write leaves
    pad = np.full((1, 3, 4, 2, 2), np.nan, np.float16)
    st.write_shard("train", 0, pad, pad, np.full((1, 3), -1), np.zeros(1), ["train/a.npz"],
                   [{"index": 0, "path": "train/a.npz", "reason": "bad"}])  # a shard of one skipped clip
    data = np.ones((1, 3, 4, 2, 2), np.float16)
    st.write_shard("train", 1, data, data, np.zeros((1, 3)), np.full(1, 3), ["train/b.npz"], [])
    st.finalize()
    assert LatentStore(tmp_path / "s").verify() == []
    assert torn.read_bytes() != b"half a shard"
    assert LatentStore(tmp_path / "s").attrs["skipped"] == [{"split": "train", "index": 0, "path": "train/a.npz",
                                                             "reason": "bad"}]


def test_metadata_digests_follow_set_attrs_and_catch_hand_edits(tmp_path):
    store, _ = make_store(tmp_path / "s", {"train": [3, 2]})
    assert set(store.attrs["meta_sha256"]) == {"vae", "latent_stats"}
    store.set_attrs(vae={**store.attrs["vae"], "scaling_factor": 0.5})  # through the library: digests follow
    LatentStore(tmp_path / "s")
    doc = json.loads((tmp_path / "s" / "zarr.json").read_text())
    doc["attributes"]["latent_stats"]["mean"][0] += 1.0
    (tmp_path / "s" / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(StoreError, match=r"s: attribute 'latent_stats' in zarr.json differs"):
        LatentStore(tmp_path / "s")
