"""`minisora demo` end to end on a miniature of the embedded default, and the re-run that reuses every step."""

import json

from typer.testing import CliRunner

from cli.main import app

ARGS = ["--clips", "8", "--test-clips", "1", "--frames", "24", "--vae-minutes", "0.02", "--train-steps", "3"]


def test_demo_runs_every_step_then_reuses_them(tmp_path):
    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["demo", "--out", str(out), *ARGS])
    assert r.exit_code == 0, r.output
    for step in range(1, 9):
        assert f"==> {step}/8" in r.output
    assert "ok: 8 train clips" in r.output  # store verify
    assert (out / "vae" / "config.json").exists() and (out / "store" / "zarr.json").exists()
    assert (out / "run" / "checkpoints" / "step-00000003" / "pipeline").is_dir()
    for name in ("continuation.gif", "continuation-vs-truth.gif", "continuation.mp4", "unconditional-00.gif"):
        assert (out / "samples" / name).stat().st_size > 0
    report = json.loads((out / "eval.json").read_text())
    assert report["generated_frames_per_clip"] == 12 and len(report["clips"]) == 1
    assert report["rollout"]["window"] == 8 and report["rollout"]["chunk"] == 1 and report["use_actions"] is True
    assert "model vs repeat-last-frame:" in r.output and f"{report['psnr_gain_over_repeat_db']:+.2f} dB PSNR" in r.output
    cfg = json.loads((out / "demo_config.json").read_text())
    assert cfg["frame_stride"] == 1 and cfg["test_clips"] == 1

    last = out / "run" / "checkpoints" / "step-00000003" / "state.json"
    written = last.stat().st_mtime_ns
    again = CliRunner().invoke(app, ["demo", "--out", str(out), *ARGS])
    assert again.exit_code == 0, again.output
    assert "reusing the trained VAE" in again.output and "reusing the complete store" in again.output
    assert "at step 3" in again.output and last.stat().st_mtime_ns == written  # resumed at its end, not retrained
    assert sorted(p.name for p in (out / "run" / "checkpoints").iterdir())[-1] == "step-00000003"
