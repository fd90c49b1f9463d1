"""Issue 23: everything read back is checked, a resumed run is the same run, through the CLI as a user runs it.

Damaged checkpoints (digests.json), edited store metadata (meta_sha256), a replaced clip under a checksummed
manifest, a resume with settings that change what is trained, `--frames 1`, a split the manifest lacks, and
two encodes into one store (the lock). The world and the case runner: tests/_bad_world.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from _bad_world import Case, World, encode_args, flip_byte, run_case, store_copy, train_args, tree_digest
from cli.main import app
from minisora.store_guard import LOCK_NAME


def _run_copy(w: World, tmp: Path) -> Path:
    shutil.copytree(w.run, tmp / "run")
    return tmp / "run"


def _step(run: Path, n: int = 2) -> Path:
    return run / "checkpoints" / f"step-{n:08d}"


def _flipped_transformer(w: World, tmp: Path) -> Path:
    run = _run_copy(w, tmp)
    flip_byte(next((_step(run) / "pipeline" / "transformer").glob("*.safetensors")), 2000)
    return run


def _flipped_model_shard(run: Path, n: int) -> Path:
    shard = next(p for p in (_step(run, n) / "model").iterdir() if not p.name.endswith(".json"))  # a weights shard
    flip_byte(shard, shard.stat().st_size - 3)  # a weight's high byte, not the header
    return shard


def _edited_attr(w: World, tmp: Path, edit) -> Path:
    store = store_copy(w, tmp)
    doc = json.loads((store / "zarr.json").read_text())
    edit(doc["attributes"])
    (store / "zarr.json").write_text(json.dumps(doc))
    return store


def _std_doubled(a: dict) -> None:
    a["latent_stats"]["std"] = [2 * x for x in a["latent_stats"]["std"]]


def _scaling_changed(a: dict) -> None:
    a["vae"]["scaling_factor"] = 0.5


def _checksummed_with_a_replaced_clip(w: World, tmp: Path) -> Path:
    from minisora.data.manifest import build_manifest

    shutil.copytree(w.data, tmp / "data")
    manifest, _ = build_manifest(tmp / "data", "dmlab", checksum=True)
    manifest.save(tmp / "manifest.json")
    first, second = sorted((tmp / "data" / "train").rglob("*.npz"))[:2]
    assert first.stat().st_size == second.stat().st_size  # the same size: only the digest tells them apart
    shutil.copy(second, first)
    return tmp / "manifest.json"


def _encode_manifest(w: World, tmp: Path, *extra) -> list:
    args = encode_args(w, tmp / "out", *extra)
    args[1] = _checksummed_with_a_replaced_clip(w, tmp)
    return args


def _resume_args(w: World, tmp: Path, *extra) -> list:
    return [*train_args(w.store, _run_copy(w, tmp)), "--steps", "3", *extra]


CASES = [
    Case("sample-damaged-transformer", lambda w, t: ["sample", "--checkpoint", _flipped_transformer(w, t), "--out",
                                                     t / "video", "--steps", "1", "--frames", "5"],
         1, ["{tmp}/run/checkpoints/step-00000002/pipeline/transformer/", "sha256 differs from the one recorded in "
             "digests.json"]),
    Case("eval-damaged-transformer", lambda w, t: ["eval", "--checkpoint", _flipped_transformer(w, t), "--store",
                                                   w.store, "--out", t / "r.json", "--frames", "5", "--seeds", "1",
                                                   "--steps", "1", "--num-clips", "1"],
         1, ["{tmp}/run/checkpoints/step-00000002/pipeline/transformer/", "sha256 differs"]),
    Case("store-verify-latent-std-edited", lambda w, t: ["store", "verify", _edited_attr(w, t, _std_doubled)],
         1, ["{tmp}/store: attribute 'latent_stats' in zarr.json differs from the one the store was encoded with"]),
    Case("store-verify-scaling-factor-edited", lambda w, t: ["store", "verify", _edited_attr(w, t, _scaling_changed)],
         1, ["{tmp}/store: attribute 'vae' in zarr.json differs"]),
    Case("train-latent-std-edited", lambda w, t: train_args(_edited_attr(w, t, _std_doubled), t / "new"),
         1, ["{tmp}/store: attribute 'latent_stats'"]),
    Case("encode-resume-latent-std-edited",
         lambda w, t: encode_args(w, _edited_attr(w, t, _std_doubled)), 1, ["{tmp}/store: attribute 'latent_stats'"]),
    Case("encode-replaced-clip", lambda w, t: _encode_manifest(w, t), 1,
         ["train/0000/00000.npz: sha256", "differs from the", "the manifest recorded"],
         keep=lambda w, t: [w.base, t / "data", t / "manifest.json"]),
    Case("resume-changes-what-is-trained",
         lambda w, t: [*_resume_args(w, t, "--frames", "8", "--seed", "1", "--model", "small"), "--store", w.store2],
         1, ["step-00000002 cannot be resumed by this run, which differs in what is trained:",
             "was trained with --model tiny; this run has --model small",
             "was trained with --frames 4; this run has --frames 8", "was trained with --seed 0; this run has --seed 1",
             "was trained on a store of VAE weights"]),
    Case("train-one-frame-window", lambda w, t: [*train_args(w.store, t / "new"), "--frames", "1"],
         1, ["--frames 1: a training window needs at least 2 latent frames"]),
    Case("encode-split-not-in-manifest", lambda w, t: encode_args(w, t / "out", "--splits", "train,val"),
         1, ["--splits val: the manifest", "has no clips in split 'val' (it has test, train)"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_integrity_case(world, tmp_path, case):
    r = run_case(world, tmp_path, case)
    assert "missing keys" not in r.output.lower()  # refused before any weights are loaded


def test_encode_replaced_clip_skipped_is_recorded(world, tmp_path):
    r = CliRunner().invoke(app, [str(a) for a in _encode_manifest(world, tmp_path, "--on-error", "skip")])
    assert r.exit_code == 0, r.output
    from minisora.store import LatentStore

    skipped = LatentStore(tmp_path / "out").attrs["skipped"]
    assert [s["path"] for s in skipped] == ["train/0000/00000.npz"] and "sha256" in skipped[0]["reason"]


def test_resume_auto_skips_a_damaged_checkpoint_and_says_so(world, tmp_path):
    run = tmp_path / "run"
    r = CliRunner().invoke(app, [str(a) for a in [*train_args(world.store, run), "--steps", "2", "--ckpt-every", "1"]])
    assert r.exit_code == 0, r.output
    shard = _flipped_model_shard(run, 2)
    damaged = tree_digest(_step(run, 2))
    explicit = CliRunner().invoke(app, [str(a) for a in [*train_args(world.store, run), "--steps", "3", "--resume",
                                                         _step(run, 2)]])
    assert explicit.exit_code == 1 and f"{shard}: sha256 differs" in " ".join(explicit.output.split())
    assert tree_digest(_step(run, 2)) == damaged  # refused: nothing moved
    r = CliRunner().invoke(app, [str(a) for a in [*train_args(world.store, run), "--steps", "3"]])
    text = " ".join(r.output.split())
    assert r.exit_code == 0, r.output
    assert f"warning: --resume auto skips step-00000002: {shard}: sha256 differs" in text, text
    assert f"resumed from {_step(run, 1)} at step 1" in text
    kept = next((run / "checkpoints").glob("abandoned-*/step-00000002"))  # moved aside, not lost
    assert tree_digest(kept) == {k.replace(str(_step(run, 2)), str(kept)): v for k, v in damaged.items()}
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "event" in x]
    assert events[-1]["skipped_damaged"] and events[-1]["at_step"] == 1


def test_old_checkpoint_and_store_without_digests_warn_once(world, tmp_path):
    run = _run_copy(world, tmp_path)
    (_step(run) / "digests.json").unlink()
    store = store_copy(world, tmp_path)
    doc = json.loads((store / "zarr.json").read_text())
    del doc["attributes"]["meta_sha256"]
    (store / "zarr.json").write_text(json.dumps(doc))
    r = CliRunner().invoke(app, ["store", "verify", str(store)])
    assert r.exit_code == 0 and r.output.count("records no digest of its VAE and latent statistics") == 1, r.output
    r = CliRunner().invoke(app, [*map(str, train_args(store, run)), "--steps", "3", "--logit-mean", "0"])
    assert r.exit_code == 0, r.output
    assert r.output.count("no digests.json (written by an older minisora)") == 1, r.output
    assert "--logit-mean 0 replaces the checkpoint's 0.5 from step 2 on" in r.output
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "event" in x]
    assert events[-1]["recipe_changes"]["logit_mean"] == [0.5, 0.0]  # the allowed change, recorded


def test_a_second_encode_into_a_locked_store_is_refused(world, tmp_path):
    store = store_copy(world, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (store / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "since": "now"}))
        before = tree_digest(store)
        r = CliRunner().invoke(app, [str(a) for a in encode_args(world, store)])
        text = " ".join(r.output.split())
        assert r.exit_code == 1 and f"{store}: another encode is writing this store" in text, text
        assert f"held by pid {holder.pid}" in text and tree_digest(store) == before
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale, taken over, and removed when this encode ends
    r = CliRunner().invoke(app, [str(a) for a in encode_args(world, store)])
    assert r.exit_code == 0, r.output
    assert not (store / LOCK_NAME).exists()
