"""Bad inputs and faults of the data and encode stages, driven through the CLI as a user would (issue 12).

The world, the case runner and the shared builders are in tests/_bad_world.py; the store, vae,
sample, eval and train cases in tests/test_bad_inputs_outputs.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from _bad_world import (Case, World, encode_args, file_at, not_waiting_for_the_hub, run_case, store_copy,
                        swap_weights, user_dir)
from cli.main import app
from minisora.store import LatentStore


def _root_with_actions(w: World, tmp: Path, actions) -> Path:
    root = tmp / "root"
    shutil.copytree(w.data, root)
    video = np.zeros((len(actions), 64, 64, 3), np.uint8)
    np.savez(root / "train" / "0000" / "bad.npz", video=video, actions=np.asarray(actions))
    return root


def _manifest_then_bad_actions(w: World, tmp: Path) -> Path:
    """A manifest whose clip got out-of-range actions after the scan (the manifest checked nothing then)."""
    from minisora.data.manifest import build_manifest

    root = tmp / "root"
    shutil.copytree(w.data, root)
    build_manifest(root, "dmlab")[0].save(tmp / "manifest.json")
    clip = root / "train" / "0000" / "00001.npz"
    with np.load(clip, allow_pickle=False) as z:
        video, actions = z["video"], z["actions"].copy()
    actions[3] = 10**6
    np.savez(clip, video=video, actions=actions)
    return tmp / "manifest.json"


def _root_with_junk(w: World, tmp: Path) -> Path:
    shutil.copytree(w.data, tmp / "r")
    (tmp / "r" / "train" / "0000" / "bad.npz").write_text("junk")
    return tmp / "r"


def _manifest_records_skips(w: World, tmp: Path, r) -> None:
    doc = json.loads((tmp / "m.json").read_text())
    assert doc["skipped"] == [{"path": "train/0000/bad.npz", "reason": "not an npz (zip) archive"}]
    assert "skipped train/0000/bad.npz: not an npz" in r.output and "train/train/" not in r.output


def _manifest_with_skips(w: World, tmp: Path) -> Path:
    doc = json.loads(Path(w.manifest).read_text())
    doc["skipped"] = [{"path": "train/0000/gone.npz", "reason": "truncated or corrupt npz archive"}]
    (tmp / "m.json").write_text(json.dumps(doc))
    return tmp / "m.json"


def _store_records_manifest_skips(w: World, tmp: Path, r) -> None:
    skipped = [{"path": "train/0000/gone.npz", "reason": "truncated or corrupt npz archive"}]
    assert LatentStore(tmp / "s").attrs["manifest_skipped"] == skipped
    shown = CliRunner().invoke(app, ["store", "info", str(tmp / "s")])
    assert "skipped train/0000/gone.npz (left out by `data manifest`)" in shown.output


def _store_encoded_then_vae_swapped(w: World, tmp: Path) -> list:
    """A store encoded by tmp/vae, whose weights were then replaced by other ones (same config, same path)."""
    shutil.copytree(w.vae, tmp / "vae")
    args = encode_args(w, tmp / "store")
    args[args.index("--vae") + 1] = tmp / "vae"
    assert CliRunner().invoke(app, list(map(str, args))).exit_code == 0
    swap_weights(w, tmp / "vae")
    return args


def _store_with_user_file(w: World, tmp: Path) -> list:
    store_copy(w, tmp)
    (tmp / "store" / "README.mine").write_text("keep me\n")
    return encode_args(w, tmp / "store", "--overwrite")


def _overwrite_kept_user_file(w: World, tmp: Path, r) -> None:
    assert (tmp / "store" / "README.mine").read_text() == "keep me\n"
    assert LatentStore(tmp / "store").attrs["complete"] and LatentStore(tmp / "store").verify() == []


def _store_with_broken_markers(w: World, tmp: Path) -> list:
    store = store_copy(w, tmp)
    (store / "train" / "_commits" / "shard-00000.json").write_text("{not json")
    (store / "train" / "_commits" / "shard-00001.json").unlink()
    return encode_args(w, store)


def _markers_rewritten(w: World, tmp: Path, r) -> None:
    assert "3 shards in train: 2, test: 1; 1 already committed" in r.output  # the two broken shards were redone
    assert LatentStore(tmp / "store").verify() == []
    for k in (0, 1):
        name = f"train/_commits/shard-{k:05d}.json"
        assert (tmp / "store" / name).read_text() == (Path(w.store) / name).read_text()  # the same bytes again


def _manifest(root, out, *extra) -> list:
    return ["data", "manifest", root, "--kind", "dmlab", "--out", out, *extra]


CASES = [
    # ------------------------------------------------------------------ data synth
    Case("synth-other-settings",
         lambda w, t: (shutil.copytree(w.data, t / "d"), ["data", "synth", "--out", t / "d", "--frames", "12"])[1],
         1, ["{tmp}/d/", "made with other settings", "frames: 9 there, 12 now"]),
    Case("synth-out-is-a-file", lambda w, t: ["data", "synth", "--out", file_at(t), "--clips", "1"],
         1, ["{tmp}/f: is an existing file; --out must be a new or existing directory"]),
    Case("synth-frames-too-few", lambda w, t: ["data", "synth", "--out", t / "d", "--frames", "1"], 2, ["--frames"]),
    # ------------------------------------------------------------------ data manifest
    Case("manifest-no-splits", lambda w, t: ((t / "r").mkdir(), _manifest(t / "r", t / "m.json"))[1],
         1, ["{tmp}/r", "has no train/ or test/ directory"]),
    Case("manifest-action-too-large", lambda w, t: _manifest(_root_with_actions(w, t, [0, 10**6, 1]), t / "m.json"),
         1, ["{tmp}/root/train/0000/bad.npz", "action id 1000000 at frame 1", "outside [0, 32767]"]),
    Case("manifest-action-negative", lambda w, t: _manifest(_root_with_actions(w, t, [0, -5, 1]), t / "m.json"),
         1, ["bad.npz", "action id -5", "[0, 32767]"]),
    Case("manifest-root-missing", lambda w, t: _manifest(t / "nope", t / "m.json"), 2, ["nope"]),
    Case("manifest-out-under-a-file", lambda w, t: _manifest(w.data, file_at(t) / "m.json"), 1, ["{tmp}/f"]),
    Case("manifest-out-is-a-directory", lambda w, t: _manifest(w.data, t),
         1, ["{tmp}: is a directory; the manifest is a file"]),
    Case("manifest-skip-records-skipped",
         lambda w, t: _manifest(_root_with_junk(w, t), t / "m.json", "--on-error", "skip"),
         0, ["1 skipped"], keep=lambda w, t: [w.base, t / "r"], check=_manifest_records_skips),
    # ------------------------------------------------------------------ encode
    Case("encode-out-user-dir", lambda w, t: encode_args(w, user_dir(t)),
         1, ["{tmp}/mine", "not a minisora latent store", "thesis.tex"]),
    Case("encode-overwrite-user-dir", lambda w, t: encode_args(w, user_dir(t), "--overwrite"),
         1, ["{tmp}/mine", "not a minisora latent store"]),
    Case("encode-out-is-a-file", lambda w, t: encode_args(w, file_at(t)), 1, ["{tmp}/f", "is an existing file"]),
    Case("encode-out-under-a-file", lambda w, t: encode_args(w, file_at(t) / "store"),
         1, ["{tmp}/f/store", "{tmp}/f is a file"]),
    Case("encode-out-unwritable", lambda w, t: encode_args(w, "/proc/minisora-store"), 1, ["/proc/minisora-store"]),
    Case("encode-resume-other-vae-weights", _store_encoded_then_vae_swapped,
         1, ["{tmp}/store was encoded by VAE weights", "now has weights", "--overwrite"]),
    Case("encode-resume-other-settings",
         lambda w, t: encode_args(w, store_copy(w, t), "--frame-stride", "2"),
         1, ["{tmp}/store exists and was encoded with other settings", "source"]),
    Case("encode-missing-local-vae", lambda w, t: ["encode", w.manifest, "--vae", t / "no" / "vae", "--out", t / "s"],
         1, ["{tmp}/no/vae: no such directory"], check=not_waiting_for_the_hub),
    Case("encode-missing-vae-under-existing-dir",
         lambda w, t: ["encode", w.manifest, "--vae", os.path.relpath(t / "vae"), "--out", t / "s"],
         1, ["vae: no such directory", "the Hub is not asked"], check=not_waiting_for_the_hub),
    Case("encode-action-out-of-range",
         lambda w, t: ["encode", _manifest_then_bad_actions(w, t), "--vae", w.vae, "--out", t / "s", "--size", "16"],
         1, ["{tmp}/root/train/0000/00001.npz", "action id 1000000 at frame 3", "[0, 32767]"],
         keep=lambda w, t: [w.base, t / "root", t / "manifest.json"]),
    Case("encode-reports-manifest-skips",
         lambda w, t: ["encode", _manifest_with_skips(w, t), "--vae", w.vae, "--out", t / "s", "--size", "16"],
         0, ["skipped train/0000/gone.npz (left out by `data manifest`): truncated or corrupt npz archive"],
         keep=lambda w, t: [w.base, t / "m.json"], check=_store_records_manifest_skips),
    Case("encode-rerun-redoes-broken-markers", _store_with_broken_markers, 0, ["complete"],
         keep=lambda w, t: [w.base], check=_markers_rewritten),
    Case("encode-bad-dtype", lambda w, t: encode_args(w, t / "s", "--dtype", "fp64"), 2, ["--dtype"]),
    Case("encode-overwrite-keeps-user-file", _store_with_user_file, 0, ["complete"],
         keep=lambda w, t: [w.base, t / "store" / "README.mine"], check=_overwrite_kept_user_file),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(world, tmp_path, case):
    run_case(world, tmp_path, case)
