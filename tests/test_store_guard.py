"""The store's writer-side guards (issue 12): narrowing writes, chunk checksums, what encode may
delete or write into, and the VAE identity check."""

import json

import fsspec
import numpy as np
import pytest
import zarr

from _store_helpers import make_store
from minisora.store import LatentStore, StoreError, narrow
from minisora.store_guard import check_out, check_vae, is_store, remove_store

LENGTHS = {"train": [5, 8, 3], "test": [4]}


def _flip(path, offset):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


# ---------------------------------------------------------------------------- narrowing writes
def test_narrow_refuses_what_the_cast_would_change():
    assert narrow(np.array([-1, 0, 32767]), np.int16, "a").tolist() == [-1, 0, 32767]
    with pytest.raises(
        StoreError, match=r"clip 7 actions: values in \[0, 1000000\] do not fit int16 \[-32768, 32767\]"
    ):
        narrow(np.array([0, 10**6]), np.int16, "clip 7 actions")  # would wrap to 16960
    with pytest.raises(StoreError, match=r"lat: \|value\| 70000 overflows float16 \(max 65504\)"):
        narrow(np.array([1.0, -7e4], np.float32), np.float16, "lat")  # would become -inf
    out = narrow(np.array([np.nan, 65504.0, -2.5], np.float32), np.float16, "lat")  # NaN padding passes
    assert np.isnan(out[0]) and out[1:].tolist() == [65504.0, -2.5] and out.dtype == np.float16


def test_write_shard_refuses_wrapping_actions_and_overflowing_latents(tmp_path):
    store, data = make_store(tmp_path / "s", {"train": [2, 2]}, clips_per_shard=2)
    mean, logvar, actions = data["train"]
    before = (tmp_path / "s" / "train" / "_commits" / "shard-00000.json").read_bytes()
    bad = actions.astype(np.int64)
    bad[0, 1] = 10**6
    with pytest.raises(StoreError, match=r"train shard 0 actions: values in \[0, 1000000\] do not fit int16"):
        store.write_shard("train", 0, mean, logvar, bad, np.array([2, 2]), ["a", "b"], [])
    with pytest.raises(StoreError, match=r"train shard 0: action ids must be >= 0 \(-1: none\), got -5"):
        store.write_shard("train", 0, mean, logvar, np.full_like(actions, -5), np.array([2, 2]), ["a", "b"], [])
    with pytest.raises(StoreError, match="train shard 0 mean: .* overflows float16"):
        store.write_shard("train", 0, mean.astype(np.float32) * 1e5, logvar, actions, np.array([2, 2]), ["a", "b"], [])
    assert (tmp_path / "s" / "train" / "_commits" / "shard-00000.json").read_bytes() == before  # marker untouched


# ---------------------------------------------------------------------------- chunk checksums
def test_new_stores_catch_a_corrupted_chunk_read_alone(tmp_path):
    make_store(tmp_path / "s", LENGTHS, clips_per_shard=2)
    st = LatentStore(tmp_path / "s")
    assert st.attrs["chunk_checksum"] == "crc32c"
    clean = st.array("train", "mean")[1]
    _flip(tmp_path / "s" / "train" / "mean" / "c" / "0" / "0" / "0" / "0" / "0", 30)  # inside clip 0's chunk
    with pytest.raises(ValueError, match="checksum"):  # zarr itself refuses the chunk: no marker needed
        zarr.open_array(tmp_path / "s" / "train" / "mean", mode="r")[0]
    with pytest.raises(StoreError, match=r"s: train/mean at 0 cannot be read .*run `minisora store verify .*s`"):
        st.read("train", "mean", 0)
    np.testing.assert_array_equal(st.read("train", "mean", 1), clean)  # the other chunk of the shard still reads


def test_old_stores_without_chunk_checksums_still_read_and_verify(tmp_path):
    _, data = make_store(tmp_path / "old", LENGTHS, clips_per_shard=2, chunk_checksum=False)
    st = LatentStore(tmp_path / "old", mode="a")
    del st.group.attrs["chunk_checksum"]  # stores of earlier versions have no such attribute
    st = LatentStore(tmp_path / "old")
    assert "chunk_checksum" not in st.attrs
    codecs = json.loads((tmp_path / "old" / "train" / "mean" / "zarr.json").read_text())["codecs"][0]["configuration"][
        "codecs"
    ]
    assert [c["name"] for c in codecs] == ["bytes", "zstd"]
    np.testing.assert_array_equal(st.read("train", "mean", slice(None)), data["train"][0])
    assert st.verify() == []


# ---------------------------------------------------------------------------- what encode may touch
def test_check_out(tmp_path):
    check_out(str(tmp_path / "new" / "store"))  # a new path
    (tmp_path / "empty").mkdir()
    check_out(str(tmp_path / "empty"))
    make_store(tmp_path / "s", LENGTHS)
    check_out(str(tmp_path / "s"))  # a store: resumable
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "paper.tex").write_text("x")
    with pytest.raises(
        StoreError, match=r"mine: is a non-empty directory that is not a minisora latent store \(holds paper.tex\)"
    ):
        check_out(str(tmp_path / "mine"))
    with pytest.raises(StoreError, match="paper.tex: is an existing file"):
        check_out(str(tmp_path / "mine" / "paper.tex"))
    with pytest.raises(StoreError, match=r"paper.tex/sub/store: cannot be created, .*paper.tex is a file"):
        check_out(str(tmp_path / "mine" / "paper.tex" / "sub" / "store"))
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"schema": "someone.else"}})
    )
    assert not is_store(fsspec.filesystem("file"), str(tmp_path / "z"))
    with pytest.raises(StoreError, match="not a minisora latent store"):
        check_out(str(tmp_path / "z"))


def test_remove_store_deletes_only_its_own_files(tmp_path):
    make_store(tmp_path / "s", LENGTHS)
    (tmp_path / "s" / "NOTES.md").write_text("mine")
    (tmp_path / "s" / "train" / "plot.png").write_bytes(b"png")
    remove_store(str(tmp_path / "s"), ["train", "test"])
    left = sorted(p.relative_to(tmp_path / "s").as_posix() for p in (tmp_path / "s").rglob("*"))
    assert left == ["NOTES.md", "train", "train/plot.png"]
    make_store(tmp_path / "t", LENGTHS)
    remove_store(str(tmp_path / "t"), ["train", "test"])
    assert not (tmp_path / "t").exists()  # nothing else was there: the directory goes too
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "a.txt").write_text("a")
    with pytest.raises(StoreError, match="u: not a minisora latent store, refusing to delete it"):
        remove_store(str(tmp_path / "u"), ["train"])
    assert (tmp_path / "u" / "a.txt").read_text() == "a"


# ---------------------------------------------------------------------------- VAE identity
def test_check_vae_names_both_digests_and_warns_on_old_stores():
    check_vae({"weights_sha256": "ab" * 32}, "ab" * 32, "S", "the pipeline's VAE")
    with pytest.raises(
        StoreError,
        match=r"S: latents were encoded by VAE weights cdcdcdcdcdcdcdcd \(/v\), but the pipeline's "
        r"VAE \(/w\) has weights abababababababab",
    ):
        check_vae({"weights_sha256": "cd" * 32, "source": "/v"}, "ab" * 32, "S", "the pipeline's VAE (/w)")
    with pytest.warns(UserWarning, match="S: the store records no VAE weights digest"):
        check_vae({"source": "/v"}, "ab" * 32, "S", "the pipeline's VAE")


# ---------------------------------------------------------------------------- the encode lock
def test_encode_lock_refuses_a_live_holder_takes_over_a_dead_one_and_skips_fsspec(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from minisora.store_guard import LOCK_NAME, encode_lock

    url = str(tmp_path / "s")
    with encode_lock(url):
        assert (tmp_path / "s" / LOCK_NAME).exists()
        assert not is_store(fsspec.filesystem("file"), url) and check_out(url) is None  # the lock is no entry
        with pytest.raises(StoreError, match=r"s: another encode is writing this store \(lock .* held by pid "):
            with encode_lock(url):
                pass
    assert not (tmp_path / "s" / LOCK_NAME).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "s" / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with encode_lock(url):  # stale: taken over
        assert json.loads((tmp_path / "s" / LOCK_NAME).read_text())["pid"] == os.getpid()
    with encode_lock("memory://locked/s"):  # no atomic create there: not locked
        pass
