"""Latent stores on S3: a real moto server on 127.0.0.1 (no other network), reached through s3fs.

The module fixture starts moto's ThreadedMotoServer on a free port and points every AWS client at
it through the environment (AWS_ENDPOINT_URL and dummy credentials), so the CLI runs its real code
paths unchanged: `encode` to s3://, `store info` and `store verify`, training and sampling that
read from s3://. Subprocesses (the killed encode) inherit the same environment. Data: 6 train and
2 test synthetic DMLab clips of 12 frames, a tiny random VAE, 16x16 frames, 2 clips per shard.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
from moto.server import ThreadedMotoServer
from typer.testing import CliRunner

from _store_helpers import store_arrays, store_markers, synthetic_clips
from cli.main import app
from minisora.store import LatentStore, StoreError

MINISORA = str(Path(sys.executable).parent / "minisora")
BUCKET = "minisora-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _fs():
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()  # another process (or zarr's own s3fs instance) may have written since we listed
    return fs


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """{"data", "manifest", "vae", "local", "url", "encode"}: clips, a VAE, a local reference store and its S3 twin."""
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(k, raising=False)
        for k in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):  # never the user's own profiles
            mp.setenv(k, os.devnull)
        fsspec.filesystem("s3").clear_instance_cache()
        _fs().mkdir(BUCKET)
        root = synthetic_clips(tmp_path_factory.mktemp("s3"), clips=6, test_clips=2, frames=12)
        encode = ["encode", root / "manifest.json", "--vae", root / "vae", "--size", "16", "--clips-per-shard", "2",
                  "--device", "cpu"]
        r = _cli(*encode, "--out", root / "local")
        assert r.exit_code == 0, r.output
        url = f"s3://{BUCKET}/store"
        r = _cli(*encode, "--out", url)
        assert r.exit_code == 0, r.output
        assert f"store {url} complete" in r.output
        yield {"root": root, "local": str(root / "local"), "url": url, "encode": encode}
        fsspec.filesystem("s3").clear_instance_cache()  # no later test may reach the stopped server
    server.stop()


def _assert_same_store(url, ref):
    got, want = store_arrays(url), store_arrays(ref)
    assert got.keys() == want.keys()
    for name in want:  # NaN padding included
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert store_markers(url) == store_markers(ref)  # every shard file has the same sha256 as the local store's
    assert LatentStore(url).attrs["latent_stats"] == LatentStore(ref).attrs["latent_stats"]


def test_encode_to_s3_info_and_verify(s3):
    keys = _fs().find(f"{BUCKET}/store")
    assert f"{BUCKET}/store/zarr.json" in keys and f"{BUCKET}/store/train/_commits/shard-00002.json" in keys
    _assert_same_store(s3["url"], s3["local"])  # the same bytes as a local encode
    info = _cli("store", "info", s3["url"])
    assert info.exit_code == 0, info.output
    assert s3["url"] in info.output and "complete" in info.output
    want = LatentStore(s3["local"]).info()
    got = LatentStore(s3["url"]).info()
    assert got["bytes"] == want["bytes"] and got["splits"]["train"]["shards"] == 3
    ok = _cli("store", "verify", s3["url"])
    assert ok.exit_code == 0 and "ok, every shard verified" in ok.output


def test_flipped_byte_on_s3_is_caught_by_verify_and_never_trained_on(s3):
    from minisora.dataset import LatentWindows

    st = LatentStore(s3["url"])
    key = f"{st.root}/{st._shard_key('train', 'mean', 1)}"
    fs = _fs()
    good = fs.cat_file(key)
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x10
    fs.pipe_file(key, bytes(bad))
    try:
        r = _cli("store", "verify", s3["url"])
        assert r.exit_code == 1
        assert f"problem: train shard 1: checksum mismatch in {key} ({len(bad)} bytes)" in r.output
        w = LatentWindows(s3["url"], "train", 4)
        with pytest.raises(StoreError) as e:
            w.read(np.array([2]), np.array([0]))  # clip 2 lives in shard 1
        msg = str(e.value)
        assert msg.startswith(f"{s3['url']}: train shard 1: checksum mismatch in {key}")
        assert f"run `minisora store verify {s3['url']}`" in msg and 1 not in w.shard_reads
    finally:
        fs.pipe_file(key, good)
    assert _cli("store", "verify", s3["url"]).exit_code == 0


def test_kill9_during_encode_to_s3_then_rerun_is_identical(s3):
    url = f"s3://{BUCKET}/killed"
    args = [*s3["encode"], "--out", url]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    p = subprocess.Popen([MINISORA, *map(str, args)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    first = f"{BUCKET}/killed/train/_commits/shard-00000.json"
    deadline = time.time() + 180
    while not _fs().exists(first):  # kill -9 as soon as the first shard is committed
        assert p.poll() is None and time.time() < deadline, p.stdout.read() if p.poll() is not None else "timeout"
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    _fs()
    st = LatentStore(url)
    assert not st.attrs["complete"]  # it really was interrupted
    pending = sum(len(st.pending_shards(s)) for s in st.splits)
    assert 0 < pending < 4
    r = _cli(*args)  # the same command again
    assert r.exit_code == 0, r.output
    assert f"{4 - pending} already committed" in r.output and f"store {url} complete" in r.output
    _fs()
    _assert_same_store(url, s3["local"])


def _losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, Path(run, "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def runs(s3):
    """The same 3 training steps read from S3 and from the local copy of the store."""
    args = ["--frames", "4", "--batch-size", "2", "--steps", "3", "--log-every", "1", "--warmup", "1",
            "--ckpt-every", "3", "--use-actions", "--device", "cpu", "--cache-shards", "2"]
    out = {}
    for name, store in (("s3", s3["url"]), ("local", s3["local"])):
        out[name] = str(s3["root"] / f"run-{name}")
        r = _cli("train", "--store", store, "--out", out[name], *args)
        assert r.exit_code == 0, r.output
    return out


def test_train_reads_from_s3(runs):
    got, want = _losses(runs["s3"]), _losses(runs["local"])
    assert sorted(got) == [1, 2, 3] and all(np.isfinite(v) for v in got.values())
    assert got == want  # the same bytes, the same order: the same losses as from the local store
    assert (Path(runs["s3"]) / "checkpoints" / "step-00000003" / "pipeline").is_dir()


def test_sample_with_context_from_s3(s3, runs, tmp_path):
    videos = {}
    for name, store in (("s3", s3["url"]), ("local", s3["local"])):
        out = tmp_path / name
        r = _cli("sample", "--checkpoint", runs["s3"], "--out", out, "--context", f"{store}:test:0",
                 "--context-frames", 2, "--frames", 6, "--steps", 2, "--actions", "context", "--format", "npz")
        assert r.exit_code == 0, r.output
        with np.load(tmp_path / f"{name}.npz", allow_pickle=False) as f:
            videos[name] = (f["frames"], f["latents"])
    st = LatentStore(s3["url"])
    stats = st.attrs["latent_stats"]
    mean = st.array("test", "mean")[0, :2].astype(np.float32)
    want = (mean - np.array(stats["mean"]).reshape(1, -1, 1, 1)) / np.array(stats["std"]).reshape(1, -1, 1, 1)
    frames, latents = videos["s3"]
    assert frames.shape == (6, 16, 16, 3) and latents.shape == (6, 4, 4, 4)
    np.testing.assert_allclose(latents[:2], want, rtol=1e-5, atol=1e-6)  # the context came from the S3 store
    np.testing.assert_array_equal(frames, videos["local"][0])  # and the same video as from the local store


@pytest.mark.slow
def test_torchrun_two_ranks_train_from_s3(s3, tmp_path):
    """Two gloo processes deal the S3 store's 3 train shards between them (the environment reaches both)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(port),
           "--no-python", MINISORA, "train", "--store", s3["url"], "--out", str(run), "--frames", "4",
           "--batch-size", "1", "--steps", "3", "--log-every", "1", "--ckpt-every", "0", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert p.returncode == 0, p.stdout
    assert "2 process(es) x batch 1" in p.stdout
    losses = _losses(run)
    assert sorted(losses) == [1, 2, 3] and all(np.isfinite(v) for v in losses.values())
