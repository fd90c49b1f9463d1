"""Stage one (`minisora encode`): tiny VAEs built from configs, synthetic DMLab clips, real stores.

Data: 5 train clips (four of 17 frames, one of 10) and 1 test clip of 17 frames, 64x64, with
actions; 2 clips per shard gives 3 train shards and 1 test shard. The reference store `ref` is
encoded once in this process; the other tests compare against it array by array (and, where
the shard geometry is the same, shard file checksum by checksum).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from _store_helpers import store_arrays, store_markers
from cli.main import app
from minisora.data.manifest import build_manifest
from minisora.data.synthetic import render_dmlab_clip, write_synthetic_dataset
from minisora.errors import MinisoraWarning
from minisora.store import LatentStore, StoreError
from minisora.vae import VideoVAE, build_vae, frames_to_pixels, tiny_vae_config
from stages.encode import EncodeConfig, main as encode_main

MINISORA = str(Path(sys.executable).parent / "minisora")
TRAIN = ["train/0000/00000.npz", "train/0000/00001.npz", "train/0000/00002.npz", "train/0000/00003.npz",
         "train/0001/short.npz"]
TEST = ["test/0000/00000.npz"]
LENGTHS = {"train": [17, 17, 17, 17, 10], "test": [17]}
FP16_RTOL, FP16_ATOL = 2**-11 + 1e-6, 2**-24  # float16 rounding: half an ulp (normal / subnormal)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """{"root", "manifest", "kl", "wan"}: clips, their manifest and two tiny VAE directories."""
    base = tmp_path_factory.mktemp("encode")
    root = base / "data"
    write_synthetic_dataset("dmlab", root, clips=4, test_clips=1, frames=17, seed=0, progress=False)
    video, actions = render_dmlab_clip(seed=99, frames=10)  # a shorter clip: padding and per-clip lengths
    (root / "train" / "0001").mkdir()
    np.savez(root / "train" / "0001" / "short.npz", video=video, actions=actions)
    manifest, skipped = build_manifest(root, "dmlab")
    assert skipped == [] and [c.path for c in manifest.clips] == TEST + TRAIN
    manifest.save(base / "manifest.json")
    torch.manual_seed(0)
    build_vae("kl", tiny_vae_config("kl", 4, 4, width=8)).model.save_pretrained(base / "kl")
    build_vae("wan", tiny_vae_config("wan", 4, 4, width=8)).model.save_pretrained(base / "wan")
    return {"root": root, "manifest": str(base / "manifest.json"), "kl": str(base / "kl"), "wan": str(base / "wan")}


def _encode(clips, out, vae="kl", **kw):
    cfg = EncodeConfig(manifest=clips["manifest"], vae=clips[vae], out=str(out), clips_per_shard=2, progress=False,
                       **kw)
    return encode_main(cfg)


@pytest.fixture(scope="module")
def ref(clips, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "store"
    _encode(clips, out)
    return str(out)


def _source(clips, split, i):
    with np.load(clips["root"] / (TRAIN if split == "train" else TEST)[i], allow_pickle=False) as z:
        return z["video"], z["actions"]


def _vae_encode(clips, frames, vae="kl", size=None):
    """The VAE's own posterior of uint8 frames (T, H, W, 3): mean, logvar (T', C, h, w) float32."""
    model = VideoVAE.load(clips[vae])
    pixels = frames_to_pixels(frames)  # (T, 3, H, W)
    if size:
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean, logvar = model.encode(pixels[None])
    return mean[0].numpy(), logvar[0].numpy()


def _assert_same_store(url, ref_url, same_shards=True):
    got, want = store_arrays(url), store_arrays(ref_url)
    assert got.keys() == want.keys()
    for name in want:  # NaN padding included: equal_nan
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert LatentStore(url).attrs["latent_stats"] == LatentStore(ref_url).attrs["latent_stats"]
    if same_shards:  # same geometry: every shard file has the same sha256 as the reference's
        assert store_markers(url) == store_markers(ref_url)


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------------------- round trip
def test_round_trip_kl_posterior_actions_padding(clips, ref):
    st = LatentStore(ref)
    assert st.splits == ["train", "test"] and st.attrs["complete"] and st.attrs["skipped"] == []
    for split, lengths in LENGTHS.items():
        mean, logvar = st.array(split, "mean")[:], st.array(split, "logvar")[:]
        actions, length = st.array(split, "actions")[:], st.array(split, "length")[:]
        assert mean.shape == (len(lengths), 17, 4, 16, 16) and mean.dtype == np.float16 and logvar.dtype == np.float16
        assert length.tolist() == lengths
        for i, n in enumerate(lengths):
            video, acts = _source(clips, split, i)
            want_mean, want_logvar = _vae_encode(clips, video)
            np.testing.assert_allclose(mean[i, :n].astype(np.float32), want_mean, rtol=FP16_RTOL, atol=FP16_ATOL)
            np.testing.assert_allclose(logvar[i, :n].astype(np.float32), want_logvar, rtol=FP16_RTOL, atol=FP16_ATOL)
            assert np.isnan(mean[i, n:]).all() and np.isnan(logvar[i, n:]).all()
            np.testing.assert_array_equal(actions[i, :n], acts)
            assert (actions[i, n:] == -1).all()
    # one chunk per clip, one file per shard per array, one marker per shard
    files = sorted(os.listdir(Path(ref) / "train" / "mean" / "c"))
    assert files == ["0", "1", "2"]
    assert sorted(os.listdir(Path(ref) / "train" / "_commits")) == [f"shard-0000{k}.json" for k in range(3)]


def test_root_attributes(clips, ref):
    from minisora import __version__
    from minisora.data.manifest import Manifest

    from diffusers import AutoencoderKL

    from minisora.vae import config_sha256, weights_sha256

    a = LatentStore(ref).attrs
    assert a["schema"] == "minisora.latents" and a["schema_version"] == 1 and a["minisora_version"] == __version__
    on_disk = AutoencoderKL.from_pretrained(clips["kl"])  # issue 12: the store names its VAE by weights digest too
    assert a["vae"] == {"source": str(Path(clips["kl"]).resolve()), "subfolder": None, "revision": None,
                        "class_name": "AutoencoderKL", "scaling_factor": 1.0, "shift_factor": 0.0,
                        "spatial_compression": 4, "temporal_compression": 1, "latent_channels": 4,
                        "deterministic": False, "weights_sha256": weights_sha256(on_disk),
                        "config_sha256": config_sha256(on_disk.config)}
    assert a["chunk_checksum"] == "crc32c"
    assert a["source"] == {"kind": "dmlab", "manifest_digest": Manifest.load(clips["manifest"]).digest(),
                           "root": str(clips["root"]), "resolution": [64, 64], "native_resolution": [64, 64],
                           "frame_stride": 1, "fps": None}  # the DMLab npz records no frame rate
    assert a["splits"]["train"] == {"clips": 5, "frames": 17, "channels": 4, "height": 16, "width": 16,
                                    "clips_per_shard": 2}
    assert a["num_actions"] == int(max(_source(clips, "train", i)[1].max() for i in range(5))) + 1
    # per-channel statistics over the train split of the samples z ~ N(mean, exp(logvar)): E[z], sqrt(Var[z])
    st = LatentStore(ref)
    mean = st.array("train", "mean")[:].astype(np.float64)
    var = np.exp(st.array("train", "logvar")[:].astype(np.float64))
    valid = ~np.isnan(mean)
    m = np.array([mean[:, :, c][valid[:, :, c]].mean() for c in range(4)])
    ez2 = np.array([(mean[:, :, c] ** 2 + var[:, :, c])[valid[:, :, c]].mean() for c in range(4)])
    np.testing.assert_allclose(a["latent_stats"]["mean"], m, rtol=1e-9)
    np.testing.assert_allclose(a["latent_stats"]["std"], np.sqrt(ez2 - m**2), rtol=1e-9)
    assert a["latent_stats"]["values_per_channel"] == sum(LENGTHS["train"]) * 16 * 16


def test_store_info_numbers(ref):
    r = _cli("store", "info", ref, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    on_disk = {}
    for split in ("train", "test"):
        on_disk[split] = sum(f.stat().st_size for name in ("mean", "logvar", "actions", "length")
                             for f in (Path(ref) / split / name).rglob("*") if f.is_file())
        sp = info["splits"][split]
        assert sp["bytes"] == on_disk[split] and sp["latent_frames"] == sum(LENGTHS[split])
        assert sp["bytes_per_frame"] == on_disk[split] / sum(LENGTHS[split])
        assert ((sp["shards"], sp["committed_shards"], sp["latent_shape"])
                == ({"train": 3, "test": 1}[split],) * 2 + ([4, 16, 16],))
    assert info["bytes"] == sum(on_disk.values()) and info["raw_pixel_bytes_per_latent_frame"] == 64 * 64 * 3
    text = _cli("store", "info", ref)
    assert text.exit_code == 0
    per_frame = on_disk["train"] / 78  # 4 x 17 + 10 latent frames
    assert "train        5 clips, 78 latent frames (max 17/clip), latent (4, 16, 16), 3/3 shards" in text.output
    assert f"{per_frame:.0f} B/frame vs 12288 B raw pixels ({12288 / per_frame:.1f}x smaller)" in text.output


# ---------------------------------------------------------------------------- verify through the CLI
def test_verify_cli_on_encoded_store(ref, tmp_path):
    ok = _cli("store", "verify", ref)
    assert ok.exit_code == 0 and "ok, every shard verified" in ok.output

    flipped = shutil.copytree(ref, tmp_path / "flipped")
    chunk = flipped / "train" / "mean" / "c" / "1" / "0" / "0" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    chunk.write_bytes(bytes(raw))
    r = _cli("store", "verify", flipped)
    assert r.exit_code == 1
    assert f"problem: train shard 1: checksum mismatch in {chunk} ({len(raw)} bytes)" in r.output
    assert "1 problem(s)" in r.output

    missing = shutil.copytree(ref, tmp_path / "missing")
    (missing / "test" / "logvar" / "c" / "0" / "0" / "0" / "0" / "0").unlink()
    r = _cli("store", "verify", missing)
    assert r.exit_code == 1 and "test shard 0: shard file" in r.output and "is missing" in r.output

    truncated = shutil.copytree(ref, tmp_path / "truncated")  # the last train shard never committed
    (truncated / "train" / "_commits" / "shard-00002.json").unlink()
    r = _cli("store", "verify", truncated)
    assert r.exit_code == 1 and "shard 2 of train is not committed" in r.output


# ---------------------------------------------------------------------------- resumption
def _popen(args, nproc=None, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    launch = [MINISORA]
    if nproc:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                  "--master_port", str(port), "--no-python", MINISORA]
    return subprocess.Popen(launch + [str(a) for a in args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kw)


def test_kill9_during_encode_then_rerun_is_identical(clips, ref, tmp_path):
    out = tmp_path / "store"
    args = ["encode", clips["manifest"], "--vae", clips["kl"], "--out", out, "--clips-per-shard", "2"]
    p = _popen(args, start_new_session=True)
    first = out / "train" / "_commits" / "shard-00000.json"
    deadline = time.time() + 120
    while not first.exists():  # kill -9 as soon as the first shard is committed
        assert p.poll() is None and time.time() < deadline, p.stdout.read() if p.poll() is not None else "timeout"
        time.sleep(0.005)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    st = LatentStore(out)
    assert not st.attrs["complete"] and st.pending_shards("test") == [0]  # it really was interrupted
    with pytest.raises(StoreError, match="incomplete"):
        st.require_complete()
    committed = 4 - sum(len(st.pending_shards(s)) for s in st.splits)
    r = _cli(*args)  # the same command again
    assert r.exit_code == 0, r.output
    assert f"4 shards in train: 3, test: 1; {committed} already committed" in r.output
    assert f"store {out} complete" in r.output
    _assert_same_store(out, ref)


def test_rerun_recovers_from_what_a_kill_leaves(clips, ref, tmp_path):
    # (a) killed while writing shard 1: its files half written, no marker, store not finalized
    out = shutil.copytree(ref, tmp_path / "half")
    (out / "train" / "_commits" / "shard-00001.json").unlink()
    for name in ("mean", "actions"):
        f = next(p for p in sorted((out / "train" / name / "c" / "1").rglob("*")) if p.is_file())
        f.write_bytes(f.read_bytes()[:7])
    LatentStore(out, mode="a").set_attrs(complete=False)
    mtime = (out / "train" / "_commits" / "shard-00000.json").stat().st_mtime_ns
    summary = _encode(clips, out)
    assert summary["rank_clips"] == 2  # only shard 1 was encoded again
    assert (out / "train" / "_commits" / "shard-00000.json").stat().st_mtime_ns == mtime
    _assert_same_store(out, ref)
    # (b) killed inside store creation, before the root attributes were written
    out = tmp_path / "created"
    _encode(clips, out)
    shutil.rmtree(out / "train" / "_commits")
    shutil.rmtree(out / "test" / "_commits")
    doc = json.loads((out / "zarr.json").read_text())
    (out / "zarr.json").write_text(json.dumps({**doc, "attributes": {}}))
    _encode(clips, out)
    _assert_same_store(out, ref)


def test_torchrun_two_processes_give_the_same_store(clips, ref, tmp_path):
    out = tmp_path / "store"
    p = _popen(["encode", clips["manifest"], "--vae", clips["kl"], "--out", out, "--clips-per-shard", "2"], nproc=2)
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log
    # round robin over shards: rank 0 takes train shards 0 and 2 (clips 0, 1 and the short clip 4)
    assert log.count("encode: 4 shards in train: 3, test: 1; 0 already committed; 2 process(es); "
                     "rank 0 encodes 3 clips") == 1
    assert "clip/s" in log and "frames_s=" in log  # rank 0's progress bar
    _assert_same_store(out, ref)


# ---------------------------------------------------------------------------- bad clips
@pytest.fixture
def bad_root(clips, tmp_path):
    """The same clips under another root with three broken: garbage, too few frames, wrong size."""
    root = shutil.copytree(clips["root"], tmp_path / "bad")
    (root / TRAIN[2]).write_bytes(b"PK\x03\x04 this is not a zip archive")
    video, actions = _source(clips, "train", 3)
    np.savez(root / TRAIN[3], video=video[:9], actions=actions[:9])
    video, actions = _source(clips, "test", 0)
    np.savez(root / TEST[0], video=np.ascontiguousarray(video[:, ::2, ::2]), actions=actions)
    return root


def test_on_error_fail_names_the_clip_and_keeps_committed_shards(clips, ref, bad_root, tmp_path):
    out = tmp_path / "store"
    args = ["encode", clips["manifest"], "--vae", clips["kl"], "--out", out, "--clips-per-shard", "2",
            "--root", bad_root]
    r = _cli(*args)
    assert r.exit_code == 1
    assert f"error: {bad_root / TRAIN[2]}: truncated or corrupt npz archive" in r.output
    assert "use --on-error skip to leave bad clips out" in r.output
    st = LatentStore(out)
    assert st.pending_shards("train") == [1, 2] and not st.attrs["complete"]
    assert st.read_commit("train", 0).checksums == LatentStore(ref).read_commit("train", 0).checksums
    r = _cli(*args, "--on-error", "skip")  # resumes: shard 0 is kept
    assert r.exit_code == 0, r.output
    assert "1 already committed" in r.output and "3 clips skipped" in r.output


def test_on_error_skip_records_bad_clips(clips, ref, bad_root, tmp_path):
    out = tmp_path / "store"
    r = _cli("encode", clips["manifest"], "--vae", clips["kl"], "--out", out, "--clips-per-shard", "2",
             "--root", bad_root, "--on-error", "skip")
    assert r.exit_code == 0, r.output
    st = LatentStore(out)
    skipped = st.attrs["skipped"]
    assert [(s["split"], s["index"], s["path"]) for s in skipped] == [("train", 2, TRAIN[2]), ("train", 3, TRAIN[3]),
                                                                      ("test", 0, TEST[0])]
    assert skipped[0]["reason"].startswith("truncated or corrupt npz archive")
    assert skipped[1]["reason"] == "decoded 9 frames, the manifest promised 17 (>= 17 after stride 1)"
    assert skipped[2]["reason"] == "frames are 32x32, the manifest promised 64x64"
    assert (st.array("train", "length")[:].tolist() == [17, 17, 0, 0, 10]
            and st.array("test", "length")[:].tolist() == [0])
    assert np.isnan(st.array("train", "mean")[2:4]).all() and (st.array("train", "actions")[2:4] == -1).all()
    want = LatentStore(ref)
    for i in (0, 1, 4):  # the good clips are encoded exactly as in the reference store
        for name in ("mean", "logvar", "actions"):
            np.testing.assert_array_equal(st.array("train", name)[i], want.array("train", name)[i])
    assert st.info()["splits"]["train"]["latent_frames"] == 44
    ok = _cli("store", "verify", out)
    assert ok.exit_code == 0, ok.output  # skipped clips are recorded, so verify accepts them


# ---------------------------------------------------------------------------- options and settings
def test_frame_stride_size_and_other_settings_refused(clips, ref, tmp_path):
    out = shutil.copytree(ref, tmp_path / "store")
    args = ["encode", clips["manifest"], "--vae", clips["kl"], "--out", out, "--clips-per-shard", "2",
            "--frame-stride", "2", "--size", "32"]
    r = _cli(*args)
    assert r.exit_code == 1
    assert (f"error: {out} exists and was encoded with other settings (source, splits/geometry differ); "
            f"pass --overwrite") in r.output
    assert store_markers(out) == store_markers(ref)  # untouched
    r = _cli(*args, "--overwrite")
    assert r.exit_code == 0, r.output
    st = LatentStore(out)
    src = st.attrs["source"]
    assert (src["frame_stride"], src["resolution"], src["native_resolution"]) == (2, [32, 32], [64, 64])
    assert st.layout("train").frames == 9 and st.layout("train").height == 8
    assert st.array("train", "length")[:].tolist() == [9, 9, 9, 9, 5]  # ceil(17 / 2), ceil(10 / 2)
    for i in (0, 4):
        video, actions = _source(clips, "train", i)
        want_mean, want_logvar = _vae_encode(clips, video[::2], size=32)
        n = len(want_mean)
        np.testing.assert_allclose(st.array("train", "mean")[i, :n].astype(np.float32), want_mean,
                                   rtol=FP16_RTOL, atol=FP16_ATOL)
        np.testing.assert_allclose(st.array("train", "logvar")[i, :n].astype(np.float32), want_logvar,
                                   rtol=FP16_RTOL, atol=FP16_ATOL)
        np.testing.assert_array_equal(st.array("train", "actions")[i, :n], actions[::2])
    # another compute dtype is refused too: it would mix two encodings in one store
    r = _cli(*args, "--dtype", "bf16")
    assert r.exit_code == 1 and "(dtype differ)" in r.output


def test_video_vae_temporal_compression(clips, tmp_path):
    out = tmp_path / "wan"
    _encode(clips, out, vae="wan")
    st = LatentStore(out)
    vae = st.attrs["vae"]
    assert (vae["class_name"], vae["temporal_compression"], vae["spatial_compression"]) == ("AutoencoderKLWan", 4, 4)
    # 17 = 1 + 4*4 frames -> 5 latent frames; the 10-frame clip uses its first 9 = 1 + 4*2 -> 3
    assert st.array("train", "length")[:].tolist() == [5, 5, 5, 5, 3] and st.layout("train").frames == 5
    for i, used in ((0, 17), (4, 9)):
        video, actions = _source(clips, "train", i)
        want_mean, want_logvar = _vae_encode(clips, video[:used], vae="wan")
        n = len(want_mean)
        np.testing.assert_allclose(st.array("train", "mean")[i, :n].astype(np.float32), want_mean,
                                   rtol=FP16_RTOL, atol=FP16_ATOL)
        np.testing.assert_allclose(st.array("train", "logvar")[i, :n].astype(np.float32), want_logvar,
                                   rtol=FP16_RTOL, atol=FP16_ATOL)
        # latent frame j covers pixel frames up to 4j: it carries the action of frame 4j
        np.testing.assert_array_equal(st.array("train", "actions")[i, :n], actions[np.arange(n) * 4])
        assert np.isnan(st.array("train", "mean")[i, n:]).all() and (st.array("train", "actions")[i, n:] == -1).all()
    assert st.info()["raw_pixel_bytes_per_latent_frame"] == 64 * 64 * 3 * 4


def test_remote_urls_memory_and_file(clips, ref, tmp_path):
    import fsspec

    url = f"memory://encode-test-{uuid.uuid4().hex}"
    try:
        _encode(clips, url)
        assert LatentStore(url).verify() == []
        _assert_same_store(url, ref)
        _encode(clips, url)  # a re-run finds every shard committed and encodes nothing
        assert store_markers(url) == store_markers(ref)
    finally:
        fsspec.filesystem("memory").rm(url.removeprefix("memory://"), recursive=True)
    file_url = f"file://{tmp_path}/store"
    summary = _encode(clips, file_url)
    assert summary["rank_clips"] == 6 and (tmp_path / "store" / "zarr.json").exists()
    _assert_same_store(file_url, ref)


def test_clips_without_actions_and_a_deterministic_vae(clips, tmp_path):
    root = tmp_path / "data"
    (root / "train" / "0000").mkdir(parents=True)
    for i in range(3):
        np.savez(root / "train" / "0000" / f"{i}.npz", video=render_dmlab_clip(seed=i, frames=5)[0])
    with pytest.warns(MinisoraWarning, match=r"0.npz: has no `actions` array, and 2 other clip\(s\) neither, "
                                             r"though the dmlab dataset card says each clip records one action"):
        manifest, _ = build_manifest(root, "dmlab")
    manifest.save(tmp_path / "manifest.json")
    build_vae("tiny", tiny_vae_config("tiny", 4, 4, width=8)).model.save_pretrained(tmp_path / "tiny")
    cfg = EncodeConfig(manifest=str(tmp_path / "manifest.json"), vae=str(tmp_path / "tiny"),
                       out=str(tmp_path / "store"), clips_per_shard=2, progress=False)
    encode_main(cfg)
    st = LatentStore(tmp_path / "store")
    assert st.splits == ["train"] and st.array_names() == ("mean", "actions", "length") and st.attrs["deterministic"]
    assert (st.array("train", "actions")[:] == -1).all() and st.attrs["num_actions"] == 0  # every shard all -1
    model = VideoVAE.load(str(tmp_path / "tiny"))
    for i in range(3):
        want, logvar = model.encode(frames_to_pixels(render_dmlab_clip(seed=i, frames=5)[0])[None])
        assert logvar is None
        np.testing.assert_allclose(st.array("train", "mean")[i].astype(np.float32), want[0].numpy(),
                                   rtol=FP16_RTOL, atol=FP16_ATOL)
    assert st.verify() == []


def test_minecraft_mp4_clips_resized_with_stride_and_fps(clips, tmp_path):
    from minisora.data.clips import read_clip

    write_synthetic_dataset("minecraft", tmp_path / "mc", clips=2, frames=9, seed=0, progress=False)
    manifest, _ = build_manifest(tmp_path / "mc", "minecraft")
    manifest.save(tmp_path / "manifest.json")
    cfg = EncodeConfig(manifest=str(tmp_path / "manifest.json"), vae=clips["kl"], out=str(tmp_path / "store"), size=32,
                       frame_stride=2, progress=False)
    encode_main(cfg)
    st = LatentStore(tmp_path / "store")
    src = st.attrs["source"]
    assert ((src["kind"], src["fps"], src["frame_stride"], src["resolution"], src["native_resolution"])
            == ("minecraft", 10.0, 2, [32, 32], [128, 128]))
    assert st.array("train", "length")[:].tolist() == [5, 5]  # frames 0, 2, 4, 6, 8
    for i, c in enumerate(manifest.clips):
        frames, actions = read_clip(manifest.abspath(c), "minecraft")
        want, _ = _vae_encode(clips, frames[::2], size=32)
        np.testing.assert_allclose(st.array("train", "mean")[i].astype(np.float32), want,
                                   rtol=FP16_RTOL, atol=FP16_ATOL)
        np.testing.assert_array_equal(st.array("train", "actions")[i], actions[::2])
