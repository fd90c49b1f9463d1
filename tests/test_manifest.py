"""Manifests: scanning TECO-layout roots, records, digest, save/load, path safety, and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from minisora.data import ClipError, read_clip
from minisora.data.manifest import Manifest, ManifestClip, ManifestError, build_manifest
from minisora.video import write_mp4


def write_npz(path: Path, frames: int, size: int = 8, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, video=rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8), actions=np.arange(frames) % 6)


@pytest.fixture
def dmlab_root(tmp_path):
    """TECO DMLab layout; written in reverse order so sorting is the scanner's doing."""
    root = tmp_path / "dmlab"
    for rel, frames in reversed([("test/0/d.npz", 6), ("train/0/a.npz", 5), ("train/0/b.npz", 7),
                                 ("train/1/c.npz", 9)]):
        write_npz(root / rel, frames, seed=frames)
    return root


@pytest.fixture(scope="module")
def minecraft_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mc") / "minecraft"
    for rel, frames in [("train/0/000000", 5), ("train/0/000001", 6), ("test/0/000000", 4)]:
        mp4 = root / f"{rel}.mp4"
        write_mp4(mp4, np.full((frames, 16, 16, 3), 100, np.uint8))
        np.savez(mp4.with_suffix(".npz"), actions=np.arange(frames))
    return root


def test_dmlab_records_sorted_relative_and_measured(dmlab_root):
    m, skipped = build_manifest(dmlab_root, "dmlab")
    assert skipped == []
    assert (m.kind, m.root, m.version) == ("dmlab", str(dmlab_root.resolve()), 1)
    assert [c.path for c in m.clips] == ["test/0/d.npz", "train/0/a.npz", "train/0/b.npz", "train/1/c.npz"]
    assert [c.split for c in m.clips] == ["test", "train", "train", "train"]
    assert [c.frames for c in m.clips] == [6, 5, 7, 9]
    a = m.clips[1]
    assert a == ManifestClip("train", "train/0/a.npz", 5, 8, 8, True, (dmlab_root / "train/0/a.npz").stat().st_size,
                             None)
    assert m.split_counts() == {"test": 1, "train": 3}
    assert [c.path for c in m.by_split("test")] == ["test/0/d.npz"]
    assert m.abspath(a) == dmlab_root.resolve() / "train" / "0" / "a.npz"
    assert build_manifest(dmlab_root, "dmlab")[0] == m  # deterministic


def test_checksums_are_sha256_of_the_clip_files(dmlab_root, minecraft_root):
    m, _ = build_manifest(dmlab_root, "dmlab", checksum=True)
    assert m.clips[0].sha256 == hashlib.sha256((dmlab_root / "test/0/d.npz").read_bytes()).hexdigest()

    mc, _ = build_manifest(minecraft_root, "minecraft", checksum=True)
    mp4, npz = minecraft_root / "train/0/000001.mp4", minecraft_root / "train/0/000001.npz"
    rec = mc.clips[2]
    assert rec.path == "train/0/000001.mp4"
    assert rec.bytes == mp4.stat().st_size + npz.stat().st_size
    assert rec.sha256 == hashlib.sha256(mp4.read_bytes() + npz.read_bytes()).hexdigest()


def test_minecraft_action_npz_files_are_not_clips(minecraft_root):
    m, skipped = build_manifest(minecraft_root, "minecraft")
    assert skipped == []
    assert [(c.path, c.frames, c.height, c.width, c.has_actions) for c in m.clips] == [
        ("test/0/000000.mp4", 4, 16, 16, True),
        ("train/0/000000.mp4", 5, 16, 16, True),
        ("train/0/000001.mp4", 6, 16, 16, True),
    ]


def test_digest_ignores_root_but_sees_every_record_and_the_kind(dmlab_root, tmp_path):
    m, _ = build_manifest(dmlab_root, "dmlab")
    moved = tmp_path / "elsewhere"
    shutil.copytree(dmlab_root, moved)
    m2, _ = build_manifest(moved, "dmlab")
    assert m2.root != m.root and m2.digest() == m.digest()
    assert len(m.digest()) == 64 and int(m.digest(), 16) >= 0

    write_npz(moved / "train/0/b.npz", 8, seed=7)  # one clip gets one more frame
    assert build_manifest(moved, "dmlab")[0].digest() != m.digest()
    assert Manifest("minecraft", m.root, m.clips).digest() != m.digest()
    assert Manifest("dmlab", m.root, m.clips[1:]).digest() != m.digest()


def test_save_load_round_trip_and_root_override(dmlab_root, tmp_path):
    m, _ = build_manifest(dmlab_root, "dmlab", checksum=True)
    out = tmp_path / "deep" / "dir" / "dmlab.json"
    m.save(out)
    assert sorted(os.listdir(out.parent)) == ["dmlab.json"]  # no temporary file left behind
    doc = json.loads(out.read_text())
    assert doc["kind"] == "dmlab" and doc["root"] == str(dmlab_root.resolve()) and len(doc["clips"]) == 4
    assert Manifest.load(out) == m

    moved = tmp_path / "moved"
    shutil.move(dmlab_root, moved)
    m2 = Manifest.load(out, root=moved)
    assert m2.root == str(moved.absolute()) and m2.clips == m.clips and m2.digest() == m.digest()
    frames, _ = read_clip(m2.abspath(m2.clips[-1]), "dmlab")
    assert frames.shape == (9, 8, 8, 3)


def _manifest_with(tmp_path, path, split="train"):
    out = tmp_path / "m.json"
    rec = dict(split=split, path=path, frames=3, height=8, width=8, has_actions=True, bytes=10)
    out.write_text(json.dumps({"version": 1, "kind": "dmlab", "root": str(tmp_path / "root"), "clips": [rec]}))
    return out


@pytest.mark.parametrize("bad", ["../x.npz", "train/../../x.npz", "/etc/x.npz", "train/0/../../../x.npz"])
def test_load_refuses_paths_outside_root(tmp_path, bad):
    out = _manifest_with(tmp_path, bad)
    with pytest.raises(ManifestError) as e:
        Manifest.load(out)
    assert str(e.value).startswith(f"{out}: clip 0: ") and repr(bad)[1:-1] in str(e.value)


def test_symlink_escaping_root_is_refused_by_load_and_build(tmp_path):
    outside = tmp_path / "outside.npz"
    write_npz(outside, 3)
    link = tmp_path / "root" / "train" / "0" / "x.npz"
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    with pytest.raises(ManifestError, match="resolves to .*outside.npz, outside the root"):
        Manifest.load(_manifest_with(tmp_path, "train/0/x.npz"))
    with pytest.raises(ClipError) as e:
        build_manifest(tmp_path / "root", "dmlab")
    assert e.value.path == str(link) and "outside the root" in e.value.problem


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d.update(version=2), "manifest version 2 is not supported"),
        (lambda d: d.update(kind="ucf"), "unknown kind 'ucf'"),
        (lambda d: d["clips"][0].update(frames="3"), "clip 0: `frames` must be int, got '3'"),
        (lambda d: d["clips"][0].update(has_actions=1), "clip 0: `has_actions` must be bool"),
        (lambda d: d["clips"][0].update(split="val"), "clip 0: split 'val' is not one of train, test"),
        (lambda d: d["clips"][0].update(path="train/0/x.mp4"), "is not a .npz file under train/"),
        (lambda d: d["clips"][0].update(sha256="abc"), "`sha256` must be null or 64 lowercase hex digits"),
        (lambda d: d["clips"][0].pop("bytes"), "clip 0: expected the fields"),
        (lambda d: d["clips"].append(dict(d["clips"][0])), "clip 1: path 'train/0/a.npz' is listed twice"),
    ],
)
def test_load_validates_every_record(tmp_path, edit, message):
    out = _manifest_with(tmp_path, "train/0/a.npz")
    doc = json.loads(out.read_text())
    edit(doc)
    out.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=None) as e:
        Manifest.load(out)
    assert str(e.value).startswith(f"{out}: ") and message in str(e.value)


def test_load_of_a_non_manifest(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(ManifestError, match="not a JSON manifest"):
        Manifest.load(bad)
    with pytest.raises(ManifestError, match="file not found"):
        Manifest.load(tmp_path / "nope.json")


def test_bad_clips_fail_first_or_are_skipped_with_reasons(dmlab_root):
    (dmlab_root / "train/0/bad.npz").write_bytes(b"garbage bytes")
    write_npz(dmlab_root / "train/1/short.npz", 2)
    (dmlab_root / "train/1/._c.npz").write_bytes(b"macOS resource fork")  # hidden: not a clip
    with pytest.raises(ClipError) as e:
        build_manifest(dmlab_root, "dmlab", min_frames=5)
    assert str(e.value) == f"{dmlab_root / 'train/0/bad.npz'}: not an npz (zip) archive"

    m, skipped = build_manifest(dmlab_root, "dmlab", on_error="skip", min_frames=6)
    assert skipped == [
        ("train/0/a.npz", "has 5 frames < 6 required"),
        ("train/0/bad.npz", "not an npz (zip) archive"),
        ("train/1/short.npz", "has 2 frames < 6 required"),
    ]
    assert [c.path for c in m.clips] == ["test/0/d.npz", "train/0/b.npz", "train/1/c.npz"]


def test_worker_pool_gives_the_same_manifest(dmlab_root):
    (dmlab_root / "train/0/bad.npz").write_bytes(b"garbage bytes")
    serial = build_manifest(dmlab_root, "dmlab", checksum=True, on_error="skip")
    assert build_manifest(dmlab_root, "dmlab", checksum=True, on_error="skip", workers=2) == serial
    with pytest.raises(ClipError, match="bad.npz: not an npz"):
        build_manifest(dmlab_root, "dmlab", workers=2)


def test_root_without_splits_is_a_clear_error(tmp_path):
    (tmp_path / "videos").mkdir()
    with pytest.raises(ClipError) as e:
        build_manifest(tmp_path, "dmlab")
    assert e.value.path == str(tmp_path.resolve()) and "has no train/ or test/ directory" in e.value.problem
    with pytest.raises(ValueError, match="on_error must be 'fail' or 'skip'"):
        build_manifest(tmp_path, "dmlab", on_error="ignore")


# ---------------------------------------------------------------- CLI: minisora data manifest


def test_cli_writes_a_manifest(dmlab_root, tmp_path):
    out = tmp_path / "manifests" / "dmlab.json"
    result = CliRunner().invoke(app, ["data", "manifest", str(dmlab_root), "--kind", "dmlab", "--out", str(out),
                                      "--checksum"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 4 clips (test: 1, train: 3), 0 skipped" in result.stdout
    m = Manifest.load(out)
    assert len(m.clips) == 4 and all(c.sha256 for c in m.clips)


def test_cli_skip_lists_bad_files_and_fail_names_the_file(dmlab_root, tmp_path):
    (dmlab_root / "train/0/bad.npz").write_bytes(b"garbage bytes")
    out = tmp_path / "m.json"
    args = ["data", "manifest", str(dmlab_root), "--kind", "dmlab", "--out", str(out)]

    result = CliRunner().invoke(app, args + ["--on-error", "skip", "--min-frames", "6"])
    assert result.exit_code == 0, result.output
    assert "skipped train/0/bad.npz: not an npz (zip) archive" in result.stderr
    assert "skipped train/0/a.npz: has 5 frames < 6 required" in result.stderr
    assert "3 clips (test: 1, train: 2), 2 skipped" in result.stdout
    assert len(Manifest.load(out).clips) == 3

    out.unlink()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert f"error: {dmlab_root / 'train/0/bad.npz'}: not an npz (zip) archive" in result.stderr
    assert not out.exists()


def test_skipped_clips_are_recorded_in_the_manifest_file(dmlab_root, tmp_path):
    (dmlab_root / "train/0/bad.npz").write_bytes(b"garbage bytes")
    m, skipped = build_manifest(dmlab_root, "dmlab", on_error="skip")
    assert m.skipped == [{"path": "train/0/bad.npz", "reason": "not an npz (zip) archive"}] and len(skipped) == 1
    m.save(tmp_path / "m.json")
    doc = json.loads((tmp_path / "m.json").read_text())
    assert doc["skipped"] == m.skipped
    back = Manifest.load(tmp_path / "m.json")
    assert back.skipped == m.skipped and back.digest() == m.digest()  # the data's identity ignores what was left out
    clean, _ = build_manifest(dmlab_root, "dmlab", on_error="skip", min_frames=1)
    clean.skipped = []
    clean.save(tmp_path / "clean.json")
    assert "skipped" not in json.loads((tmp_path / "clean.json").read_text())  # files without skips read as before
    doc["skipped"] = [{"path": 3}]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=r"bad.json: `skipped` must be a list of"):
        Manifest.load(tmp_path / "bad.json")
