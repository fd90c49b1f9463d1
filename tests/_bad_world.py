"""Shared by the bad-input suite (tests/test_bad_inputs*.py): the world, the case runner, builders.

The world (built once per session): 3 + 1 synthetic DMLab clips of 9 frames, two tiny random VAEs
with the same config and other weights, a store encoded with each (16x16 frames), a 2-step run.
Each case builds its bad input under its own tmp directory, runs one `minisora ...` command
through CliRunner and asserts the exit code, that the message names the file or the value, and
that nothing already written changed: the digest of every file of the world and of the case's
directory is the same before and after (cases meant to write name what must stay instead).
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from typer.testing import CliRunner

from cli.main import app
from minisora.data.manifest import build_manifest
from minisora.data.synthetic import write_synthetic_dataset
from minisora.vae import build_vae, tiny_vae_config


@dataclass
class World:
    base: Path
    data: Path  # synthetic DMLab root: 3 train + 1 test clips of 9 frames
    manifest: str
    vae: str  # tiny random AutoencoderKL
    vae2: str  # the same config, other weights
    store: str  # encoded with vae at 16x16, 2 clips per shard
    store2: str  # the same clips, encoded with vae2
    run: str  # 2 training steps on store (window 4), checkpoint at step 2


def build_world(base: Path) -> World:
    from stages.encode import EncodeConfig, main as encode_main
    from stages.train import TrainConfig, main as train_main

    write_synthetic_dataset("dmlab", base / "data", clips=3, test_clips=1, frames=9, seed=0, progress=False)
    manifest, _ = build_manifest(base / "data", "dmlab")
    manifest.save(base / "manifest.json")
    for seed, name, store in ((0, "vae", "store"), (1, "vae2", "store2")):
        torch.manual_seed(seed)
        build_vae("kl", tiny_vae_config("kl")).model.save_pretrained(base / name)
        encode_main(EncodeConfig(manifest=str(base / "manifest.json"), vae=str(base / name), out=str(base / store),
                                 size=16, clips_per_shard=2, progress=False, device="cpu"))
    train_main(TrainConfig(store=str(base / "store"), out=str(base / "run"), frames=4, batch_size=2, steps=2,
                           warmup=1, ckpt_every=2, log_every=1, device="cpu"))
    return World(base, base / "data", str(base / "manifest.json"), str(base / "vae"), str(base / "vae2"),
                 str(base / "store"), str(base / "store2"), str(base / "run"))


# ---------------------------------------------------------------------------- cases
@dataclass
class Case:
    id: str
    make: Callable[[World, Path], list]  # builds the bad input under tmp, returns the CLI arguments
    code: int
    says: list[str]  # fragments of the message ({tmp}, {base} filled in); whitespace is normalised
    keep: Callable[[World, Path], list] | None = None  # what must not change (default: the world and tmp)
    check: Callable[[World, Path, object], None] | None = None  # more assertions on the outcome


def tree_digest(*roots: Path) -> dict[str, str]:
    """sha256 of every file (and the set of directories) under `roots`."""
    out = {}
    for root in map(Path, roots):
        if root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
            continue
        for p in sorted(root.rglob("*")) if root.exists() else []:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def run_case(world: World, tmp: Path, case: Case):
    args = [str(a) for a in case.make(world, tmp)]
    keep = case.keep(world, tmp) if case.keep else [world.base, tmp]
    before = tree_digest(*keep)
    t0 = time.perf_counter()
    r = CliRunner().invoke(app, args)
    r.elapsed = time.perf_counter() - t0
    text = " ".join(r.output.split())
    assert r.exit_code == case.code, (r.exit_code, r.output, r.exception)
    for frag in case.says:
        assert frag.format(tmp=tmp, base=world.base) in text, text
    if case.code == 1:  # a clear message, no traceback: the command exited, nothing escaped it
        assert "Traceback" not in r.output and isinstance(r.exception, SystemExit), r.exception
    assert tree_digest(*keep) == before
    if case.check:
        case.check(world, tmp, r)
    return r


# ---------------------------------------------------------------------------- builders
def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def file_at(tmp: Path, text: str = "x") -> Path:
    (tmp / "f").write_text(text)
    return tmp / "f"


def user_dir(tmp: Path) -> Path:
    d = tmp / "mine"
    (d / "notes").mkdir(parents=True)
    (d / "thesis.tex").write_text("years of work\n")
    (d / "notes" / "a.txt").write_text("notes\n")
    return d


def store_copy(w: World, tmp: Path, which: str = "store") -> Path:
    shutil.copytree(w.store if which == "store" else w.store2, tmp / "store")
    return tmp / "store"


def swap_weights(w: World, vae_dir: Path) -> None:
    """Give a copy of the VAE other weights (vae2's), keeping its path and config."""
    name = "diffusion_pytorch_model.safetensors"
    shutil.copy(Path(w.vae2) / name, Path(vae_dir) / name)


def encode_args(w: World, out, *extra) -> list:
    return ["encode", w.manifest, "--vae", w.vae, "--out", out, "--size", "16", "--clips-per-shard", "2", *extra]


def sample_args(w: World, tmp: Path, *extra) -> list:
    return ["sample", "--checkpoint", w.run, "--out", tmp / "out" / "video", "--steps", "1", "--frames", "5", *extra]


def eval_args(w: World, tmp: Path, store, out=None) -> list:
    return ["eval", "--checkpoint", w.run, "--store", store, "--out", out or tmp / "report.json", "--frames", "5",
            "--context-frames", "2", "--seeds", "1", "--steps", "1", "--num-clips", "1"]


def train_args(store, out) -> list:
    return ["train", "--store", store, "--out", out, "--steps", "1", "--frames", "4", "--batch-size", "2",
            "--device", "cpu"]


def not_waiting_for_the_hub(w: World, tmp: Path, r) -> None:
    assert r.elapsed < 10, f"took {r.elapsed:.1f}s: the Hub was asked"
