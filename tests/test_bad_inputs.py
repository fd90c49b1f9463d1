"""Bad inputs and faults over every stage, driven through the CLI as a user would (issue 12).

Each case builds its bad input in its own directory, runs one `minisora ...` command and asserts
the exit code, that the one-line message names the file or the value, and that nothing already
written changed: the digest of every file of the shared world and of the case's directory is the
same before and after (cases that are meant to write name what must stay instead).

The shared world (built once): 3 + 1 synthetic DMLab clips of 9 frames, two tiny random VAEs with
the same config and other weights, a store encoded with each (16x16 frames), and a 2-step run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from minisora.store import LatentStore
from _bad_world import World, build_world, flip_byte


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.mktemp("bad"))


def tree_digest(*roots: Path) -> dict[str, str]:
    """sha256 of every file (and the set of directories) under `roots`."""
    out = {}
    for root in roots:
        root = Path(root)
        if root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
            continue
        for p in sorted(root.rglob("*")) if root.exists() else []:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


@dataclass
class Case:
    id: str
    make: Callable[[World, Path], list]  # builds the bad input under tmp, returns the CLI arguments
    code: int
    says: list[str]  # fragments of the message ({tmp}, {base} filled in); whitespace is normalised
    keep: Callable[[World, Path], list] | None = None  # what must not change (default: the world and tmp)
    check: Callable[[World, Path, object], None] | None = None  # more assertions on the outcome
    marks: list = field(default_factory=list)


def _user_dir(tmp: Path) -> Path:
    d = tmp / "mine"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work\n")
    (d / "notes").mkdir()
    (d / "notes" / "a.txt").write_text("notes\n")
    return d


def _npz_with_actions(w: World, tmp: Path, actions) -> Path:
    root = tmp / "root"
    shutil.copytree(w.data, root)
    video = np.zeros((len(actions), 64, 64, 3), np.uint8)
    np.savez(root / "train" / "0000" / "bad.npz", video=video, actions=np.asarray(actions))
    return root


def _manifest_with_bad_actions(w: World, tmp: Path) -> Path:
    """A manifest whose clip got out-of-range actions after the scan (the manifest checked nothing then)."""
    from minisora.data.manifest import build_manifest

    root = tmp / "root"
    shutil.copytree(w.data, root)
    m, _ = build_manifest(root, "dmlab")
    m.save(tmp / "manifest.json")
    clip = root / "train" / "0000" / "00001.npz"
    with np.load(clip, allow_pickle=False) as z:
        video, actions = z["video"], z["actions"].copy()
    actions[3] = 10**6
    np.savez(clip, video=video, actions=actions)
    return tmp / "manifest.json"


def _store_copy(w: World, tmp: Path, name: str = "store") -> Path:
    dst = tmp / name
    shutil.copytree(w.store if name == "store" else w.store2, dst)
    return dst


def _incomplete_store(w: World, tmp: Path) -> Path:
    dst = _store_copy(w, tmp)
    s = LatentStore(dst, mode="a")
    s.group.attrs.update({"complete": False})
    del s.group.attrs["latent_stats"]  # what an interrupted encode leaves: no statistics yet
    return dst


def _corrupt_test_chunk(w: World, tmp: Path) -> Path:
    dst = _store_copy(w, tmp)
    flip_byte(dst / "test" / "mean" / "c" / "0" / "0" / "0" / "0" / "0", 40)
    return dst


def _marker(w: World, tmp: Path, how: str) -> Path:
    dst = _store_copy(w, tmp)
    marker = dst / "train" / "_commits" / "shard-00000.json"
    if how == "delete":
        marker.unlink()
    else:
        marker.write_text("{not json")
    return dst


def _swapped_vae_store(w: World, tmp: Path) -> list:
    """A store encoded by tmp/vae, whose weights were then replaced by other ones (same config, same path)."""
    shutil.copytree(w.vae, tmp / "vae")
    args = [
        "encode",
        w.manifest,
        "--vae",
        tmp / "vae",
        "--out",
        tmp / "store",
        "--size",
        "16",
        "--clips-per-shard",
        "2",
    ]
    assert CliRunner().invoke(app, list(map(str, args))).exit_code == 0
    shutil.copy(
        Path(w.vae2) / "diffusion_pytorch_model.safetensors", tmp / "vae" / "diffusion_pytorch_model.safetensors"
    )
    return args


def _encode(w: World, out, *extra) -> list:
    return ["encode", w.manifest, "--vae", w.vae, "--out", out, "--size", "16", "--clips-per-shard", "2", *extra]


def _sample(w: World, tmp: Path, *extra) -> list:
    return ["sample", "--checkpoint", w.run, "--out", tmp / "out" / "video", "--steps", "1", "--frames", "5", *extra]


def _eval(w: World, tmp: Path, store, out=None) -> list:
    out = out or tmp / "report.json"
    return ["eval", "--checkpoint", w.run, "--store", store, "--out", out, "--frames", "5", "--context-frames", "2",
            "--seeds", "1", "--steps", "1", "--num-clips", "1"]  # fmt: skip


def _train(store, out) -> list:
    return [
        "train",
        "--store",
        store,
        "--out",
        out,
        "--steps",
        "1",
        "--frames",
        "4",
        "--batch-size",
        "2",
        "--device",
        "cpu",
    ]


def _manifest_has_skipped(w: World, tmp: Path, r) -> None:
    doc = json.loads((tmp / "m.json").read_text())
    assert doc["skipped"] == [{"path": "train/0000/bad.npz", "reason": "not an npz (zip) archive"}]
    assert "skipped train/0000/bad.npz: not an npz" in r.output and "train/train/" not in r.output


def _overwrite_kept_user_file(w: World, tmp: Path, r) -> None:
    assert (tmp / "store" / "README.mine").read_text() == "keep me\n"
    assert LatentStore(tmp / "store").attrs["complete"] and LatentStore(tmp / "store").verify() == []


def _prepare_store_with_user_file(w: World, tmp: Path) -> list:
    _store_copy(w, tmp)
    (tmp / "store" / "README.mine").write_text("keep me\n")
    return _encode(w, tmp / "store", "--overwrite")


def _old_store_without_digest(w: World, tmp: Path) -> Path:
    dst = _store_copy(w, tmp)
    s = LatentStore(dst, mode="a")
    s.set_attrs(vae={k: v for k, v in s.attrs["vae"].items() if k not in ("weights_sha256", "config_sha256")})
    return dst


def _manifest_with_skips(w: World, tmp: Path) -> Path:
    doc = json.loads(Path(w.manifest).read_text())
    doc["skipped"] = [{"path": "train/0000/gone.npz", "reason": "truncated or corrupt npz archive"}]
    (tmp / "m.json").write_text(json.dumps(doc))
    return tmp / "m.json"


def _store_records_manifest_skips(w: World, tmp: Path, r) -> None:
    assert LatentStore(tmp / "s").attrs["manifest_skipped"] == [
        {"path": "train/0000/gone.npz", "reason": "truncated or corrupt npz archive"}
    ]
    r2 = CliRunner().invoke(app, ["store", "info", str(tmp / "s")])
    assert "skipped train/0000/gone.npz (left out by `data manifest`)" in r2.output


def _run_whose_vae_changed(w: World, tmp: Path) -> Path:
    """A copy of the run whose VAE directory (a copy too) got other weights after training."""
    shutil.copytree(w.vae, tmp / "vae")
    shutil.copytree(w.run, tmp / "run")
    for meta_path in (tmp / "run").rglob("minisora_pipeline.json"):
        meta = json.loads(meta_path.read_text())
        meta["vae"]["source"] = str(tmp / "vae")
        meta_path.write_text(json.dumps(meta))
    shutil.copy(Path(w.vae2) / "diffusion_pytorch_model.safetensors", tmp / "vae" / "diffusion_pytorch_model.safetensors")
    return tmp / "run"


def _not_waiting_for_the_hub(w: World, tmp: Path, r) -> None:
    assert r.elapsed < 10, f"took {r.elapsed:.1f}s: the Hub was asked"


CASES = [
    # ------------------------------------------------------------------ data synth
    Case(
        "synth-other-settings",
        lambda w, t: (
            shutil.copytree(w.data, t / "d"),
            ["data", "synth", "--out", t / "d", "--clips", "3", "--frames", "12"],
        )[1],
        1,
        ["{tmp}/d/", "made with other settings", "frames: 9 there, 12 now"],
    ),
    Case(
        "synth-out-is-a-file",
        lambda w, t: ((t / "f").write_text("x"), ["data", "synth", "--out", t / "f", "--clips", "1"])[1],
        1,
        ["{tmp}/f: is an existing file; --out must be a new or existing directory"],
    ),
    Case("synth-frames-too-few", lambda w, t: ["data", "synth", "--out", t / "d", "--frames", "1"], 2, ["--frames"]),
    # ------------------------------------------------------------------ data manifest
    Case(
        "manifest-no-splits",
        lambda w, t: ((t / "r").mkdir(), ["data", "manifest", t / "r", "--kind", "dmlab", "--out", t / "m.json"])[1],
        1,
        ["{tmp}/r", "has no train/ or test/ directory"],
    ),
    Case(
        "manifest-action-too-large",
        lambda w, t: [
            "data",
            "manifest",
            _npz_with_actions(w, t, [0, 10**6, 1]),
            "--kind",
            "dmlab",
            "--out",
            t / "m.json",
        ],
        1,
        ["{tmp}/root/train/0000/bad.npz", "action id 1000000 at frame 1", "outside [0, 32767]"],
    ),
    Case(
        "manifest-action-negative",
        lambda w, t: [
            "data",
            "manifest",
            _npz_with_actions(w, t, [0, -5, 1]),
            "--kind",
            "dmlab",
            "--out",
            t / "m.json",
        ],
        1,
        ["bad.npz", "action id -5", "[0, 32767]"],
    ),
    Case(
        "manifest-root-missing",
        lambda w, t: ["data", "manifest", t / "nope", "--kind", "dmlab", "--out", t / "m.json"],
        2,
        ["nope"],
    ),
    Case(
        "manifest-out-under-a-file",
        lambda w, t: (
            (t / "f").write_text("x"),
            ["data", "manifest", w.data, "--kind", "dmlab", "--out", t / "f" / "m.json"],
        )[1],
        1,
        ["{tmp}/f"],
    ),
    Case(
        "manifest-out-is-a-directory",
        lambda w, t: ["data", "manifest", w.data, "--kind", "dmlab", "--out", t],
        1,
        ["{tmp}: is a directory; the manifest is a file"],
    ),
    Case(
        "manifest-skip-records-skipped",
        lambda w, t: (
            shutil.copytree(w.data, t / "r"),
            (t / "r" / "train" / "0000" / "bad.npz").write_text("junk"),
            ["data", "manifest", t / "r", "--kind", "dmlab", "--out", t / "m.json", "--on-error", "skip"],
        )[2],
        0,
        ["1 skipped"],
        keep=lambda w, t: [w.base, t / "r"],
        check=_manifest_has_skipped,
    ),
    # ------------------------------------------------------------------ encode
    Case(
        "encode-out-user-dir",
        lambda w, t: _encode(w, _user_dir(t)),
        1,
        ["{tmp}/mine", "not a minisora latent store", "thesis.tex"],
    ),
    Case(
        "encode-overwrite-user-dir",
        lambda w, t: _encode(w, _user_dir(t), "--overwrite"),
        1,
        ["{tmp}/mine", "not a minisora latent store"],
    ),
    Case(
        "encode-out-is-a-file",
        lambda w, t: ((t / "f").write_text("x"), _encode(w, t / "f"))[1],
        1,
        ["{tmp}/f", "is an existing file"],
    ),
    Case(
        "encode-out-under-a-file",
        lambda w, t: ((t / "f").write_text("x"), _encode(w, t / "f" / "store"))[1],
        1,
        ["{tmp}/f/store", "{tmp}/f is a file"],
    ),
    Case("encode-out-unwritable", lambda w, t: _encode(w, "/proc/minisora-store"), 1, ["/proc/minisora-store"]),
    Case(
        "encode-resume-other-vae-weights",
        lambda w, t: _swapped_vae_store(w, t),
        1,
        ["{tmp}/store was encoded by VAE weights", "now has weights", "--overwrite"],
    ),
    Case(
        "encode-resume-other-settings",
        lambda w, t: (_store_copy(w, t), _encode(w, t / "store", "--frame-stride", "2"))[1],
        1,
        ["{tmp}/store exists and was encoded with other settings", "source"],
    ),
    Case(
        "encode-missing-local-vae",
        lambda w, t: ["encode", w.manifest, "--vae", t / "no" / "vae", "--out", t / "s"],
        1,
        ["{tmp}/no/vae: no such directory"],
        check=_not_waiting_for_the_hub,
    ),
    Case(
        "encode-missing-vae-under-existing-dir",
        lambda w, t: ["encode", w.manifest, "--vae", os.path.relpath(t / "vae"), "--out", t / "s"],
        1,
        ["vae: no such directory", "the Hub is not asked"],
        check=_not_waiting_for_the_hub,
    ),
    Case(
        "encode-action-out-of-range",
        lambda w, t: ["encode", _manifest_with_bad_actions(w, t), "--vae", w.vae, "--out", t / "s", "--size", "16"],
        1,
        ["{tmp}/root/train/0000/00001.npz", "action id 1000000 at frame 3", "[0, 32767]"],
        keep=lambda w, t: [w.base, t / "root", t / "manifest.json"],
    ),
    Case(
        "encode-reports-manifest-skips",
        lambda w, t: [
            "encode",
            _manifest_with_skips(w, t),
            "--vae",
            w.vae,
            "--out",
            t / "s",
            "--size",
            "16",
            "--clips-per-shard",
            "2",
        ],
        0,
        ["skipped train/0000/gone.npz (left out by `data manifest`): truncated or corrupt npz archive"],
        keep=lambda w, t: [w.base, t / "m.json"],
        check=_store_records_manifest_skips,
    ),
    Case("encode-bad-dtype", lambda w, t: _encode(w, t / "s", "--dtype", "fp64"), 2, ["--dtype"]),
    Case(
        "encode-overwrite-keeps-user-file",
        _prepare_store_with_user_file,
        0,
        ["complete"],
        keep=lambda w, t: [w.base, t / "store" / "README.mine"],
        check=_overwrite_kept_user_file,
    ),
    # ------------------------------------------------------------------ store
    Case(
        "store-verify-flipped-byte",
        lambda w, t: ["store", "verify", _corrupt_test_chunk(w, t)],
        1,
        ["test shard 0: checksum mismatch in {tmp}/store/test/mean/c/0/0/0/0/0"],
    ),
    Case(
        "store-verify-marker-invalid-json",
        lambda w, t: ["store", "verify", _marker(w, t, "json")],
        1,
        ["commit marker {tmp}/store/train/_commits/shard-00000.json is unreadable"],
    ),
    Case(
        "store-verify-marker-deleted",
        lambda w, t: ["store", "verify", _marker(w, t, "delete")],
        1,
        ["shard 0 of train is not committed"],
    ),
    Case("store-info-not-a-store", lambda w, t: ["store", "info", _user_dir(t)], 1, ["{tmp}/mine: not a latent store"]),
    # ------------------------------------------------------------------ vae
    Case(
        "vae-info-missing-local",
        lambda w, t: ["vae", "info", t / "nothing"],
        1,
        ["{tmp}/nothing: no such directory"],
        check=_not_waiting_for_the_hub,
    ),
    Case("vae-info-a-file", lambda w, t: ["vae", "info", w.manifest], 1, ["manifest.json: is a file"]),
    # ------------------------------------------------------------------ sample
    Case(
        "sample-context-other-vae",
        lambda w, t: _sample(w, t, "--context", f"{w.store2}:test:0", "--context-frames", "2"),
        1,
        ["store2:test:0: latents were encoded by VAE weights", "the pipeline's VAE", "has weights"],
    ),
    Case(
        "sample-context-incomplete-store",
        lambda w, t: _sample(w, t, "--context", f"{_incomplete_store(w, t)}:test:0"),
        1,
        ["{tmp}/store: store is incomplete"],
    ),
    Case(
        "sample-context-corrupt-chunk",
        lambda w, t: _sample(w, t, "--context", f"{_corrupt_test_chunk(w, t)}:test:0", "--context-frames", "2"),
        1,
        ["{tmp}/store: test/mean", "store verify"],
    ),
    Case(
        "sample-context-index-out-of-range",
        lambda w, t: _sample(w, t, "--context", f"{w.store}:test:7"),
        1,
        ["store:test:7: index 7 out of range, test has 1 clips"],
    ),
    Case(
        "sample-context-old-store-warns",
        lambda w, t: _sample(
            w, t, "--context", f"{_old_store_without_digest(w, t)}:test:0", "--context-frames", "2", "--format", "npz"
        ),
        0,
        ["warning: {tmp}/store:test:0: the store records no VAE weights digest", "video"],
        keep=lambda w, t: [w.base, t / "store"],
    ),
    Case(
        "sample-pipeline-vae-changed",
        lambda w, t: ["sample", "--checkpoint", _run_whose_vae_changed(w, t), "--out", t / "v", "--steps", "1"],
        1,
        ["the model was trained on latents of VAE weights", "{tmp}/vae now holds weights", "restore that VAE"],
    ),
    Case(
        "sample-not-a-run",
        lambda w, t: ["sample", "--checkpoint", t, "--out", t / "v"],
        1,
        ["not a run, checkpoint or pipeline"],
    ),
    Case(
        "sample-out-under-a-file",
        lambda w, t: (
            (t / "f").write_text("x"),
            ["sample", "--checkpoint", w.run, "--out", t / "f" / "v", "--steps", "1"],
        )[1],
        1,
        ["{tmp}/f"],
    ),
    # ------------------------------------------------------------------ eval
    Case(
        "eval-store-other-vae", lambda w, t: _eval(w, t, w.store2), 1, ["store2: latents were encoded by VAE weights"]
    ),
    Case("eval-store-missing", lambda w, t: _eval(w, t, t / "nostore"), 1, ["{tmp}/nostore: not a latent store"]),
    Case(
        "eval-out-under-a-file",
        lambda w, t: ((t / "f").write_text("x"), _eval(w, t, w.store, out=t / "f" / "r.json"))[1],
        1,
        ["{tmp}/f/r.json"],
    ),
    # ------------------------------------------------------------------ train
    Case(
        "train-store-missing",
        lambda w, t: ["train", "--store", t / "nostore", "--out", t / "run", "--steps", "1"],
        1,
        ["{tmp}/nostore: not a latent store"],
    ),
    Case(
        "train-store-incomplete",
        lambda w, t: ["train", "--store", _incomplete_store(w, t), "--out", t / "run", "--steps", "1"],
        1,
        ["{tmp}/store: store is incomplete"],
    ),
    Case(
        "train-out-under-a-file",
        lambda w, t: ((t / "f").write_text("x"), _train(w.store, t / "f" / "run"))[1],
        1,
        ["{tmp}/f/run"],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(world, tmp_path, case):
    args = [str(a) for a in case.make(world, tmp_path)]
    keep = case.keep(world, tmp_path) if case.keep else [world.base, tmp_path]
    before = tree_digest(*keep)
    t0 = time.perf_counter()
    r = CliRunner().invoke(app, args)
    r.elapsed = time.perf_counter() - t0
    text = " ".join(r.output.split())
    assert r.exit_code == case.code, (r.exit_code, r.output, r.exception)
    for frag in case.says:
        assert frag.format(tmp=tmp_path, base=world.base) in text, text
    if case.code == 1:  # a clear message, no traceback: the command exited, nothing escaped it
        assert "Traceback" not in r.output and isinstance(r.exception, SystemExit), r.exception
    assert tree_digest(*keep) == before
    if case.check:
        case.check(world, tmp_path, r)


def test_debug_shows_the_traceback(world, tmp_path, monkeypatch):
    monkeypatch.setenv("MINISORA_DEBUG", "0")  # restored at teardown, though --debug sets it to 1
    r = CliRunner().invoke(app, ["--debug", "store", "info", str(tmp_path)])
    assert r.exit_code == 1 and type(r.exception).__name__ == "StoreError" and str(tmp_path) in str(r.exception)
    monkeypatch.setenv("MINISORA_DEBUG", "0")
    r = CliRunner().invoke(app, ["store", "info", str(tmp_path)])
    assert (
        r.exit_code == 1
        and f"error: {tmp_path}: not a latent store" in r.output
        and r.exception.__class__ is SystemExit
    )


def test_at_least_thirty_cases_over_every_stage():
    stages = {c.id.split("-")[0] for c in CASES}
    assert len(CASES) >= 30 and stages >= {"synth", "manifest", "encode", "store", "vae", "sample", "eval", "train"}
