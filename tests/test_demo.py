"""`minisora demo` end to end on a miniature of the embedded default: two fresh runs give the same
numbers, a re-run reuses every step, and the terminal shows only minisora's own lines."""

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from typer.testing import CliRunner

from cli.main import app
from minisora import plugins
from stages.demo import RECIPES
from stages.evaluate import format_table

ARGS = ["--clips", "8", "--test-clips", "1", "--frames", "24", "--vae-steps", "4", "--train-steps", "3",
        "--precision", "fp32"]
MINISORA = str(Path(sys.executable).parent / "minisora")
# what another package's warning or notice looks like on the terminal
THIRD_PARTY = re.compile(r"Warning:|warnings\.warn|tensornvme|apex|bitsandbytes|kernels-community|"
                         r"should be kept in float32|torch\.rms_norm")


def third_party_lines(output: str) -> list[str]:
    """The lines of a terminal's output (progress bars split at carriage returns) that are not minisora's."""
    return [line for line in re.split(r"[\r\n]", output) if THIRD_PARTY.search(line)]


def _eval_numbers(report: dict) -> dict:
    """Everything in an eval report that a run computes: all but the config, the clips' and the plot's paths."""
    return {k: v for k, v in report.items() if k not in ("config", "clips", "horizon_plot")} | {
        "clip_names": [Path(c).name for c in report["clips"]]}


def test_demo_runs_every_step_then_reuses_them_and_a_fresh_run_gives_the_same_numbers(tmp_path):
    out = tmp_path / "demo"
    # as a user runs it, stderr and stdout on one terminal (in this process pytest would take the warnings), with
    # the threads of this process (conftest.py), so that its numbers are those of the in-process run below
    # a world of its own (earlier tests may have launched a process group in this process), and no --debug
    env = {k: v for k, v in plugins.fresh_world_env(dict(os.environ)).items() if k != "MINISORA_DEBUG"}
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    run = subprocess.run([MINISORA, "demo", "--out", str(out), *ARGS], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=1200)
    output = run.stdout
    assert run.returncode == 0, output
    assert not third_party_lines(output), "not minisora's:\n" + "\n".join(third_party_lines(output))
    assert re.search(r"minisora demo on cpu, CPU capability \w+", output)
    assert "precision fp32: asked for on CPU capability" in output
    assert output.count("sampling precision fp32: asked for") == 3  # the choice reaches sample (x2) and eval
    assert re.search(r"Total wall time \d+\.\d min \(\d+s\) with fp32 on CPU capability", output)
    for step in range(1, 9):
        assert f"==> {step}/8" in output
    assert "ok: 8 train clips" in output  # store verify
    assert (out / "vae" / "config.json").exists() and (out / "store" / "zarr.json").exists()
    vae_info = json.loads((out / "vae" / "train_info.json").read_text())
    assert vae_info["steps"] == 4 and vae_info["precision"] == "fp32" and vae_info["config"]["max_minutes"] is None
    assert (out / "run" / "checkpoints" / "step-00000003" / "pipeline").is_dir()
    for name in ("continuation.gif", "continuation-vs-truth.gif", "continuation.mp4", "unconditional-00.gif"):
        assert (out / "samples" / name).stat().st_size > 0
    report = json.loads((out / "eval.json").read_text())
    assert report["generated_frames_per_clip"] == 12 and len(report["clips"]) == 1
    assert report["rollout"]["window"] == 8 and report["rollout"]["chunk"] == 1 and report["use_actions"] is True
    assert report["config"]["steps"] == RECIPES["dmlab"].sample_steps == 5 and report["config"]["context_noise"] == 0
    assert ("model vs repeat-last-frame:" in output
            and f"{report['psnr_gain_over_repeat_db']:+.2f} dB PSNR" in output)
    cfg = json.loads((out / "demo_config.json").read_text())
    assert cfg["frame_stride"] == 1 and cfg["test_clips"] == 1 and cfg["resolved_precision"] == "fp32"
    assert "vae_minutes" not in cfg  # no wall-clock budget anywhere

    # a second fresh directory: the same seed, torch and precision give the same model and numbers
    other = tmp_path / "again"
    r2 = CliRunner().invoke(app, ["demo", "--out", str(other), *ARGS])
    assert r2.exit_code == 0, r2.output
    assert json.loads((other / "vae" / "train_info.json").read_text())["test_psnr"] == vae_info["test_psnr"]
    report2 = json.loads((other / "eval.json").read_text())
    assert _eval_numbers(report2) == _eval_numbers(report)  # every number, at full float precision
    assert format_table(report) in output and format_table(report2) in r2.output  # the printed tables match

    last = out / "run" / "checkpoints" / "step-00000003" / "state.json"
    written = last.stat().st_mtime_ns
    again = CliRunner().invoke(app, ["demo", "--out", str(out), *ARGS])
    assert again.exit_code == 0, again.output
    assert "reusing the trained VAE" in again.output and "reusing the complete store" in again.output
    assert "at step 3" in again.output and last.stat().st_mtime_ns == written  # resumed at its end, not retrained
    assert "step 3, already trained" in again.output and "loss nan" not in again.output
    assert sorted(p.name for p in (out / "run" / "checkpoints").iterdir())[-1] == "step-00000003"


def test_third_party_warnings_are_hidden_by_message_and_module_and_shown_with_debug(monkeypatch):
    from cli.main import QUIET_WARNINGS, _options

    def shown(debug: bool) -> list[str]:
        monkeypatch.setenv("MINISORA_DEBUG", "0")  # restored after the test, whatever --debug sets
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            _options(debug=debug)
            for message, category, module in QUIET_WARNINGS:
                warnings.warn_explicit(f"{message} (...)", category, "x.py", 1, module=module.replace("\\", ""))
            warnings.warn_explicit("Please install apex from source", UserWarning, "x.py", 1, module="elsewhere")
        return [str(w.message) for w in seen]

    assert shown(debug=False) == ["Please install apex from source"]  # the same words from another module
    assert len(shown(debug=True)) == len(QUIET_WARNINGS) + 1


def test_the_data_recipe_fills_the_clip_counts_and_eval_scores_all_test_clips_unless_told():
    from stages.demo import DemoConfig, with_recipe

    maze, doom = with_recipe(DemoConfig()), with_recipe(DemoConfig(data="doom"))
    assert (maze.clips, maze.test_clips, maze.eval_clips) == (32, 16, 16)
    assert (doom.clips, doom.test_clips, doom.eval_clips) == (64, 64, 64)  # 16 clips cannot measure its gain
    assert (doom.vae_steps, maze.vae_steps) == (RECIPES["doom"].vae_steps, RECIPES["dmlab"].vae_steps)
    told = with_recipe(DemoConfig(data="doom", clips=8, test_clips=4, eval_clips=2))
    assert (told.clips, told.test_clips, told.eval_clips) == (8, 4, 2)
    assert with_recipe(DemoConfig(data="doom", test_clips=4, eval_clips=9)).eval_clips == 4  # at most the test clips
