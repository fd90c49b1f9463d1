"""Issue 23, "every path means what it says": each case driven through the CLI as a user would, asserting
the exit code, the one-line message and that nothing was written or lost (minisora/paths.py)."""

import json
import os

import pytest
from typer.testing import CliRunner

from _bad_world import tree_digest
from cli.main import app


def _cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    text = " ".join(r.output.split())
    assert r.exit_code == 1, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit), r.exception
    return text


@pytest.mark.parametrize("args, says", [
    (["train", "--store", "st", "--out", "s3://bucket/run"], "--out s3://bucket/run: is a URL; --out takes a local"),
    (["sample", "--checkpoint", "s3://bucket/run", "--out", "v"], "--checkpoint s3://bucket/run: is a URL"),
    (["sample", "--checkpoint", "run", "--out", "s3://bucket/v"], "--out s3://bucket/v: is a URL"),
    (["eval", "--checkpoint", "run", "--store", "st", "--out", "s3://bucket/r.json"], "--out s3://bucket/r.json: is"),
    (["train", "--store", "nofs://x/st", "--out", "run"], "--store nofs://x/st: nofs:// is not usable"),
    (["vae", "info", "hf://org/vae"], "--vae hf://org/vae: is a URL; --vae takes a local diffusers model directory"),
    (["store", "info", "nofs://x"], "STORE nofs://x: nofs:// is not usable"),
])
def test_a_url_where_the_option_takes_none_is_refused_and_nothing_is_written(tmp_path, monkeypatch, args, says):
    monkeypatch.chdir(tmp_path)
    assert says in _cli(*args)
    assert list(tmp_path.iterdir()) == []  # no local folder named `s3:`


@pytest.mark.parametrize("command", [["vae", "train", "--manifest", "m.json"], ["train", "--store", "st"],
                                     ["data", "synth"], ["demo"]])
def test_an_output_under_a_file_is_refused_before_any_work(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.json").write_text("{}")
    (tmp_path / "f").write_text("x")
    before = tree_digest(tmp_path)
    assert f"--out f/o: cannot be created, {tmp_path}/f is a file" in _cli(*command, "--out", "f/o")
    assert "--out f: is an existing file" in _cli(*command, "--out", "f")
    assert tree_digest(tmp_path) == before


def test_synth_over_a_root_with_more_clips_refuses_and_keeps_them(tmp_path):
    root = tmp_path / "d"
    r = CliRunner().invoke(app, ["data", "synth", "--out", root, "--clips", "4", "--test-clips", "1", "--frames", "3"])
    assert r.exit_code == 0, r.output
    before = tree_digest(root)
    text = _cli("data", "synth", "--out", root, "--clips", "2", "--test-clips", "1", "--frames", "3")
    assert f"{root}: holds 2 other clips (2 train) beyond the 2 train + 1 test asked for" in text
    assert tree_digest(root) == before


def test_demo_rerun_with_another_vae_steps_is_refused_before_its_config_is_rewritten(tmp_path):
    out = tmp_path / "demo"
    (out / "vae").mkdir(parents=True)
    (out / "vae" / "config.json").write_text("{}")
    old = {"clips": 8, "test_clips": 1, "frames": 24, "seed": 0, "vae_steps": 4, "vae_width": 16,
           "resolved_precision": "fp32"}
    (out / "demo_config.json").write_text(json.dumps(old))
    before = tree_digest(out)
    text = _cli("demo", "--out", out, "--clips", "8", "--test-clips", "1", "--frames", "24", "--vae-steps", "8",
                "--precision", "fp32")
    assert f"{out}/vae: the vae step was made with other settings (--vae-steps 4 there, 8 now)" in text
    assert tree_digest(out) == before


def test_demo_rerun_on_a_run_trained_with_another_recipe_is_refused(tmp_path):
    """A recipe change that shapes the model (its lr) would otherwise reuse the finished run with the new recipe's
    sampler; an older record without the recipe is not refused for it."""
    from stages.demo import RECIPES, Paths, check_reuse

    out = tmp_path / "demo"
    (out / "run" / "checkpoints").mkdir(parents=True)
    args = ["demo", "--out", out, "--clips", "8", "--test-clips", "1", "--frames", "24", "--vae-steps", "4",
            "--precision", "fp32"]
    old = {"data": "dmlab", "clips": 8, "test_clips": 1, "frames": 24, "seed": 0, "vae_steps": 4, "vae_width": 16,
           "resolved_precision": "fp32", "recipe": {"lr": 5e-4}}
    (out / "demo_config.json").write_text(json.dumps(old))
    before = tree_digest(out)
    text = _cli(*args)
    assert (f"{out}/run: the run step was made with other settings (the recipe's lr 0.0005 there, "
            f"{RECIPES['dmlab'].lr} now)") in text
    assert tree_digest(out) == before
    now = {**old, "recipe": vars(RECIPES["dmlab"])}  # these settings with today's recipe, as main() records them
    (out / "demo_config.json").write_text(json.dumps({k: v for k, v in old.items() if k != "recipe"}))
    check_reuse(Paths.under(out), now)  # an older record without a recipe: what it recorded matches, no error


def test_s3_without_credentials_is_one_line_naming_the_url(tmp_path, monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    text = _cli("store", "info", "s3://minisora-none/store")
    assert "error: s3://minisora-none/store: no usable S3 credentials" in text
    fsspec.filesystem("s3").clear_instance_cache()


def test_a_missing_vae_name_fails_at_once_offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    text = _cli("vae", "info", "no-such-vae-name")
    assert "no-such-vae-name: cannot reach the Hugging Face Hub" in text


def test_s3_with_no_server_is_one_line_naming_the_url(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "minisora")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "minisora")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    text = _cli("store", "info", "s3://minisora-none/store")
    assert "error: s3://minisora-none/store: cannot reach the S3 endpoint" in text and "Traceback" not in text
    fsspec.filesystem("s3").clear_instance_cache()
