"""Bad inputs and faults of the store, vae, sample, eval and train commands, through the CLI (issue 12).

The world, the case runner and the shared builders are in tests/_bad_world.py; the data and
encode cases in tests/test_bad_inputs.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from _bad_world import (Case, World, eval_args, file_at, flip_byte, not_waiting_for_the_hub, run_case,
                        sample_args, store_copy, swap_weights, train_args, user_dir)
from cli.main import app
from minisora.checkpoint import write_digests
from minisora.store import LatentStore


def _incomplete_store(w: World, tmp: Path) -> Path:
    s = LatentStore(store_copy(w, tmp), mode="a")
    s.group.attrs.update({"complete": False})
    del s.group.attrs["latent_stats"]  # what an interrupted encode leaves: no statistics yet
    return tmp / "store"


def _corrupt_test_chunk(w: World, tmp: Path) -> Path:
    flip_byte(store_copy(w, tmp) / "test" / "mean" / "c" / "0" / "0" / "0" / "0" / "0", 40)
    return tmp / "store"


def _marker(w: World, tmp: Path, how: str) -> Path:
    marker = store_copy(w, tmp) / "train" / "_commits" / "shard-00000.json"
    marker.unlink() if how == "delete" else marker.write_text("{not json")
    return tmp / "store"


def _old_store_without_digest(w: World, tmp: Path) -> Path:
    s = LatentStore(store_copy(w, tmp), mode="a")
    s.set_attrs(vae={k: v for k, v in s.attrs["vae"].items() if k not in ("weights_sha256", "config_sha256")})
    return tmp / "store"


def _run_whose_vae_changed(w: World, tmp: Path) -> Path:
    """A copy of the run whose VAE directory (a copy too) got other weights after training."""
    shutil.copytree(w.vae, tmp / "vae")
    shutil.copytree(w.run, tmp / "run")
    for meta_path in (tmp / "run").rglob("minisora_pipeline.json"):
        meta = json.loads(meta_path.read_text())
        meta["vae"]["source"] = str(tmp / "vae")
        meta_path.write_text(json.dumps(meta))
        write_digests(meta_path.parent.parent)  # as if trained with the VAE there: the checkpoint is intact
    swap_weights(w, tmp / "vae")
    return tmp / "run"


def _context(store, k: int = 2) -> list:
    return ["--context", f"{store}:test:0", "--context-frames", str(k)]


CASES = [
    # ------------------------------------------------------------------ store
    Case("store-verify-flipped-byte", lambda w, t: ["store", "verify", _corrupt_test_chunk(w, t)],
         1, ["test shard 0: checksum mismatch in {tmp}/store/test/mean/c/0/0/0/0/0"]),
    Case("store-verify-marker-invalid-json", lambda w, t: ["store", "verify", _marker(w, t, "json")],
         1, ["commit marker {tmp}/store/train/_commits/shard-00000.json is unreadable"]),
    Case("store-verify-marker-deleted", lambda w, t: ["store", "verify", _marker(w, t, "delete")],
         1, ["shard 0 of train is not committed"]),
    Case("store-info-not-a-store", lambda w, t: ["store", "info", user_dir(t)], 1, ["{tmp}/mine: not a latent store"]),
    # ------------------------------------------------------------------ vae
    Case("vae-info-missing-local", lambda w, t: ["vae", "info", t / "nothing"],
         1, ["{tmp}/nothing: no such directory"], check=not_waiting_for_the_hub),
    Case("vae-info-a-file", lambda w, t: ["vae", "info", w.manifest], 1, ["manifest.json: is a file"]),
    # ------------------------------------------------------------------ sample
    Case("sample-context-other-vae", lambda w, t: sample_args(w, t, *_context(w.store2)),
         1, ["store2:test:0: latents were encoded by VAE weights", "the pipeline's VAE", "has weights"]),
    Case("sample-context-incomplete-store", lambda w, t: sample_args(w, t, *_context(_incomplete_store(w, t))),
         1, ["{tmp}/store: store is incomplete"]),
    Case("sample-context-corrupt-chunk", lambda w, t: sample_args(w, t, *_context(_corrupt_test_chunk(w, t))),
         1, ["{tmp}/store: test/mean", "store verify"]),
    Case("sample-context-index-out-of-range", lambda w, t: sample_args(w, t, "--context", f"{w.store}:test:7"),
         1, ["store:test:7: index 7 out of range, test has 1 clips"]),
    Case("sample-context-old-store-warns",
         lambda w, t: sample_args(w, t, *_context(_old_store_without_digest(w, t)), "--format", "npz"),
         0, ["warning: {tmp}/store:test:0: the store records no VAE weights digest", "video"],
         keep=lambda w, t: [w.base, t / "store"]),
    Case("sample-pipeline-vae-changed",
         lambda w, t: ["sample", "--checkpoint", _run_whose_vae_changed(w, t), "--out", t / "v", "--steps", "1"],
         1, ["the model was trained on latents of VAE weights", "{tmp}/vae now holds weights", "restore that VAE"]),
    Case("sample-not-a-run", lambda w, t: ["sample", "--checkpoint", t, "--out", t / "v"],
         1, ["not a run, checkpoint or pipeline"]),
    Case("sample-out-under-a-file", lambda w, t: ["sample", "--checkpoint", w.run, "--out", file_at(t) / "v"],
         1, ["--out {tmp}/f/v: cannot be created, {tmp}/f is a file"]),
    # ------------------------------------------------------------------ eval
    Case("eval-store-other-vae", lambda w, t: eval_args(w, t, w.store2),
         1, ["store2: latents were encoded by VAE weights"]),
    Case("eval-store-missing", lambda w, t: eval_args(w, t, t / "nostore"), 1, ["{tmp}/nostore: not a latent store"]),
    Case("eval-out-under-a-file", lambda w, t: eval_args(w, t, w.store, out=file_at(t) / "r.json"),
         1, ["--out {tmp}/f/r.json: cannot be created, {tmp}/f is a file"]),
    Case("eval-out-is-a-directory", lambda w, t: eval_args(w, t, w.store, out=t), 1, ["--out {tmp}: is a directory"]),
    # ------------------------------------------------------------------ train (handled before issue 12: kept so)
    Case("train-store-missing", lambda w, t: train_args(t / "nostore", t / "run"),
         1, ["{tmp}/nostore: not a latent store"]),
    Case("train-store-incomplete", lambda w, t: train_args(_incomplete_store(w, t), t / "run"),
         1, ["{tmp}/store: store is incomplete"]),
    Case("train-out-under-a-file", lambda w, t: train_args(w.store, file_at(t) / "run"), 1, ["{tmp}/f/run"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(world, tmp_path, case):
    run_case(world, tmp_path, case)


def test_debug_shows_the_traceback(world, tmp_path, monkeypatch):
    monkeypatch.setenv("MINISORA_DEBUG", "0")  # restored at teardown, though --debug sets it to 1
    r = CliRunner().invoke(app, ["--debug", "store", "info", str(tmp_path)])
    assert r.exit_code == 1 and type(r.exception).__name__ == "StoreError" and str(tmp_path) in str(r.exception)
    monkeypatch.setenv("MINISORA_DEBUG", "0")
    r = CliRunner().invoke(app, ["store", "info", str(tmp_path)])
    assert r.exit_code == 1 and f"error: {tmp_path}: not a latent store" in r.output
    assert isinstance(r.exception, SystemExit)


def test_at_least_thirty_cases_over_every_stage():
    from test_bad_inputs import CASES as DATA_CASES

    cases = DATA_CASES + CASES
    stages = {c.id.split("-")[0] for c in cases}
    assert len(cases) >= 30 and len({c.id for c in cases}) == len(cases)
    assert stages >= {"synth", "manifest", "encode", "store", "vae", "sample", "eval", "train"}
