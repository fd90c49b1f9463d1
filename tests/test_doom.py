"""The ViZDoom clip source (`data synth --kind doom`): determinism, policies, layout, its card, and no vizdoom.

What is pinned: the bytes of one short clip's frames and actions, for vizdoom 1.3.2 (the version
`make setup` installs). What cannot be pinned across versions: the engine's software renderer, its
physics and the Freedoom assets it ships decide the pixels, and the walk reads the engine's depth
buffer, so another vizdoom may change both the frames and the actions; that pin is skipped there and
only same-seed-same-bytes is checked.
"""

import hashlib
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from minisora import plugins
from minisora.data import CARDS_DIR, read_clip
from minisora.data.manifest import Manifest

from minisora.data.synthetic import write_synthetic_dataset
from minisora.data.synthetic.doom import DOOM_ACTIONS, DOOM_LEVELS, render_doom_clip
from stages.demo import RECIPES

try:
    import vizdoom
except ImportError:  # `make setup` installs it (the doom extra); without it only the install hint is tested
    vizdoom = None
needs_vizdoom = pytest.mark.skipif(vizdoom is None, reason="vizdoom is not installed: pip install 'minisora[doom]'")

PINNED_VERSION = "1.3.2"
CLIP_SHA256 = "325c978091819bb7b1c2dda8af89a6db14cab7fe842a27303877de84375d47b9"  # render_doom_clip(0, 8, 64, "walk")


def _digest(video: np.ndarray, actions: np.ndarray) -> str:
    return hashlib.sha256(video.tobytes() + actions.tobytes()).hexdigest()


@needs_vizdoom
def test_doom_clip_is_deterministic_and_pinned():
    video, actions = render_doom_clip(0, 8, 64, "walk")
    assert video.shape == (8, 64, 64, 3) and video.dtype == np.uint8
    assert actions.shape == (8,) and actions.dtype == np.int64
    assert 20 < video.mean() < 235 and video.std() > 10  # a textured, lit picture, not a blank screen
    again = render_doom_clip(0, 8, 64, "walk")
    assert np.array_equal(video, again[0]) and np.array_equal(actions, again[1])
    assert not np.array_equal(video, render_doom_clip(1, 8, 64, "walk")[0])
    if vizdoom.__version__ != PINNED_VERSION:
        pytest.skip(f"pixels pinned for vizdoom {PINNED_VERSION}, this is {vizdoom.__version__}")
    assert _digest(video, actions) == CLIP_SHA256


@needs_vizdoom
def test_look_turns_on_the_spot_and_walk_moves():
    look_video, look = render_doom_clip(2, 40, 64, "look")
    names = {DOOM_ACTIONS[a] for a in look}
    assert names <= {"noop", "turn_left", "turn_right"} and names & {"turn_left", "turn_right"}
    moved = np.abs(np.diff(look_video.astype(np.int16), axis=0)).mean((1, 2, 3))
    assert moved.max() > 5  # the view turns
    _, walk = render_doom_clip(2, 40, 64, "walk")
    assert set(walk.tolist()) <= set(range(len(DOOM_ACTIONS)))
    assert {DOOM_ACTIONS[a] for a in walk} & {"forward", "forward_left", "forward_right"}


@needs_vizdoom
def test_128_pixels():
    """The same seed at 128 walks its own path: the walk reads the depth buffer at the engine's resolution."""
    video, actions = render_doom_clip(4, 3, 128, "look")
    assert video.shape == (3, 128, 128, 3) and actions.shape == (3,)
    assert video.std() > 10


@needs_vizdoom
def test_cli_writes_dmlab_layout_that_manifest_reads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "doom"
    result = CliRunner().invoke(app, ["data", "synth", "--kind", "doom", "--out", str(out), "--clips", "2",
                                      "--test-clips", "1", "--frames", "6", "--seed", "3", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "wrote 3 doom clips (18 frames)" in result.output
    params = json.loads((out / "synthetic.json").read_text())
    assert params["kind"] == "doom" and params["size"] == 64 and params["vizdoom"] == vizdoom.__version__
    result = CliRunner().invoke(app, ["data", "manifest", str(out), "--kind", "dmlab", "--out",
                                      str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    manifest = Manifest.load(tmp_path / "m.json")
    assert manifest.split_counts() == {"test": 1, "train": 2}
    frames, actions = read_clip(manifest.abspath(manifest.clips[1]), "dmlab")
    assert frames.shape == (6, 64, 64, 3) and actions.max() < len(DOOM_ACTIONS)
    one = tmp_path / "one"  # one worker writes the same bytes
    write_synthetic_dataset("doom", one, clips=2, test_clips=1, frames=6, seed=3, progress=False)
    for p in sorted(out.rglob("*.npz")):
        assert p.read_bytes() == (one / p.relative_to(out)).read_bytes()
    assert not list(tmp_path.glob("_vizdoom*"))  # the engine's settings files stay out of the working directory
    refused = CliRunner().invoke(app, ["data", "synth", "--kind", "doom", "--size", "128", "--out", str(out),
                                       "--clips", "2", "--test-clips", "1", "--frames", "6", "--seed", "3"])
    assert refused.exit_code == 1 and "size: 64 there, 128 now" in refused.output


def test_card_names_the_actions_and_levels_the_writer_uses():
    card = json.loads((CARDS_DIR / "doom.json").read_text())
    assert tuple(card["actions"]["names"]) == DOOM_ACTIONS and card["actions"]["count"] == len(DOOM_ACTIONS)
    assert tuple(card["levels"]) == DOOM_LEVELS and card["manifest_kind"] == "dmlab"


def test_bad_options_name_the_option(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["data", "synth", "--kind", "doom", "--size", "96", "--out", str(tmp_path / "a")])
    assert result.exit_code == 1 and "--size 96: doom clips are 64 or 128 pixels" in result.output
    result = runner.invoke(app, ["data", "synth", "--kind", "dmlab", "--size", "64", "--out", str(tmp_path / "b")])
    assert result.exit_code == 1 and "--size exists for --kind doom only" in result.output
    result = runner.invoke(app, ["data", "synth", "--kind", "dmlab", "--motion", "look", "--out", str(tmp_path / "c")])
    assert result.exit_code == 1 and "--motion look exists for --kind doom only, not dmlab" in result.output
    assert not any(tmp_path.iterdir())


def test_without_vizdoom_it_says_how_to_install_it(tmp_path):
    """A child process where `import vizdoom` really fails: Python refuses a module whose sys.modules entry is None
    (the documented way to block an import), as it would fail where the package is missing."""
    code = "import sys; sys.modules['vizdoom'] = None; from cli.main import app; app()"
    out = tmp_path / "doom"
    proc = subprocess.run([sys.executable, "-c", code, "data", "synth", "--kind", "doom", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, env=plugins.fresh_world_env(dict(os.environ)))
    assert proc.returncode == 1
    assert "needs the vizdoom package" in proc.stderr and "pip install 'minisora[doom]'" in proc.stderr
    assert "make setup" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()  # nothing written


@needs_vizdoom
def test_demo_on_doom_frames_end_to_end(tmp_path):
    """`minisora demo --data doom` in miniature: every step runs on ViZDoom clips; the data step's settings are
    recorded, so a re-run with the maze is refused instead of reusing Doom clips."""
    out = tmp_path / "demo"
    args = ["demo", "--data", "doom", "--out", str(out), "--clips", "2", "--test-clips", "1", "--frames", "16",
            "--vae-steps", "2", "--train-steps", "2", "--precision", "fp32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "1/8 ViZDoom (Freedoom levels, walk) clips" in result.output
    assert json.loads((out / "data" / "synthetic.json").read_text())["kind"] == "doom"
    recorded = json.loads((out / "demo_config.json").read_text())
    assert recorded["data"] == "doom" and recorded["recipe"]["lr"] == RECIPES["doom"].lr
    report = json.loads((out / "eval.json").read_text())
    assert report["use_actions"] is True and report["generated_frames_per_clip"] == 12
    # Doom's recipe (stages.demo.RECIPES), not the maze's, reaches training and eval
    assert json.loads((out / "run" / "config.json").read_text())["lr"] == RECIPES["doom"].lr != RECIPES["dmlab"].lr
    assert report["config"]["steps"] == RECIPES["doom"].sample_steps != RECIPES["dmlab"].sample_steps
    assert report["config"]["context_noise"] == RECIPES["doom"].context_noise
    assert "copy_check" in json.loads((out / "vae" / "train_info.json").read_text())
    again = CliRunner().invoke(app, [a if a != "doom" else "dmlab" for a in args])
    assert again.exit_code == 1 and "--data doom there, dmlab now" in again.output


def test_eval_warns_once_when_the_vae_ceiling_is_below_copying():
    from minisora.errors import MinisoraWarning
    from stages.evaluate import warn_if_ceiling_below_copy

    def baselines(ceiling):
        return {"repeat_last_context_frame": {"psnr_mse": 22.6}, "latent_copy": {"psnr_mse": 21.0},
                "vae_reconstruction": {"psnr_mse": ceiling}}

    with pytest.warns(MinisoraWarning) as seen:
        warn_if_ceiling_below_copy(baselines(22.3), "vae/doom")
    assert len(seen) == 1 and "\n" not in str(seen[0].message)
    assert "vae/doom: the VAE's reconstruction (22.30 dB" in str(seen[0].message)
    assert "below repeat_last_context_frame (22.60 dB)" in str(seen[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_ceiling_below_copy(baselines(24.0), "vae/doom")  # above both: silent
