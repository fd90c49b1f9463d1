"""Training stage: real ColossalAI TorchDDPPlugin runs under torchrun (2 CPU processes, gloo)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from _store_helpers import make_store
from cli.main import app

MINISORA = str(Path(sys.executable).parent / "minisora")
TRAIN_ARGS = ["--frames", "4", "--batch-size", "2", "--log-every", "1", "--warmup", "2", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "store"
    make_store(path, {"train": [8] * 16, "test": [8] * 2}, clips_per_shard=4, hw=(4, 4))
    return str(path)


def _torchrun(args, nproc=2, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port", str(_port()),
           "--no-python", MINISORA, "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run):
    records = map(json.loads, Path(run, "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}  # not the resume / branch event lines


@pytest.mark.slow
def test_torchrun_ddp_kill_and_resume_is_exact(store, tmp_path):
    args = ["--store", store, *TRAIN_ARGS, "--steps", "8", "--ckpt-every", "3", "--keep-last", "2"]
    ref = _torchrun(args + ["--out", str(tmp_path / "ref")])
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out
    ref_losses = _losses(tmp_path / "ref")
    assert sorted(ref_losses) == list(range(1, 9))

    run = tmp_path / "killed"
    p = _torchrun(args + ["--out", str(run)], start_new_session=True)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step-00000003").exists():  # kill -9 right after the first checkpoint
        assert p.poll() is None and time.time() < deadline, p.stdout.read() if p.poll() is not None else "timeout"
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    resumed = _torchrun(args + ["--out", str(run)])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resumed from" in out and "step-0000000" in out
    got = _losses(run)
    assert got == ref_losses
    logged = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert logged == sorted(set(logged))  # steps logged after the checkpoint, before the kill, are not repeated
    # pruning: --keep-last 2 leaves the two newest of steps 3, 6, 8
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000006", "step-00000008"]
    ckpt = run / "checkpoints" / "step-00000008"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 8 and state["world_size"] == 2 and state["config"]["model"] == "tiny"
    assert (ckpt / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    meta = json.loads((ckpt / "pipeline" / "minisora_pipeline.json").read_text())
    assert meta["frames"] == 4 and len(meta["latent_stats"]["mean"]) == 4

    # a different world size is refused, naming both
    single = CliRunner().invoke(app, ["train", "--store", store, "--out", str(run), *TRAIN_ARGS, "--steps", "9"])
    assert single.exit_code == 1
    assert "written by 2 processes x batch 2" in single.output and "this run has 1 x 2" in single.output


def test_single_process_checkpoints_are_atomic_and_pruned(store, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000099.tmp").mkdir(parents=True)  # a half-written checkpoint from a crash
    r = CliRunner().invoke(app, ["train", "--store", store, "--out", str(run), *TRAIN_ARGS, "--steps", "4",
                                 "--ckpt-every", "1", "--keep-last", "2"])
    assert r.exit_code == 0, r.output
    assert "resumed" not in r.output  # the .tmp directory is not a checkpoint
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.endswith(".tmp"))
    assert names == ["step-00000003", "step-00000004"]
    losses = _losses(run)
    assert sorted(losses) == [1, 2, 3, 4] and all(v == v and v > 0 for v in losses.values())
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["steps"] == 4 and cfg["flow"]["p_full"] == 0.5


def test_lr_schedule_warmup_cosine_and_constant():
    import math

    from stages.train import lr_lambda

    cos = lr_lambda(warmup=10, steps=110, schedule="cosine", min_ratio=0.1)
    assert [cos(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])  # linear warm-up
    assert cos(10) == pytest.approx(1.0) and cos(60) == pytest.approx(0.55)  # half-way down the cosine
    assert cos(110) == pytest.approx(0.1) and cos(500) == pytest.approx(0.1)  # floor at min_ratio, also past the end
    values = [cos(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay
    assert cos(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    const = lr_lambda(warmup=10, steps=110, schedule="constant")
    assert const(9) == pytest.approx(1.0) and const(100) == 1.0
    with pytest.raises(ValueError, match="unknown lr schedule 'linear'"):
        lr_lambda(10, 100, "linear")


def test_bad_lr_schedule_is_a_clear_cli_error(store, tmp_path):
    r = CliRunner().invoke(app, ["train", "--store", store, "--out", str(tmp_path / "run"), "--lr-schedule", "step"])
    assert r.exit_code == 1 and "--lr-schedule must be one of constant, cosine (got 'step')" in r.output
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cuda_only_plugins_refused_on_cpu(store, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for plugin in ("zero1", "zero2", "gemini"):
        r = CliRunner().invoke(app, ["train", "--store", store, "--out", str(tmp_path / plugin), "--plugin", plugin,
                                     "--steps", "1"])
        assert r.exit_code == 1
        assert f"--plugin {plugin} needs CUDA GPUs" in r.output and "use --plugin ddp" in r.output


def test_sample_every_writes_validation_gifs_and_psnr(tmp_path):
    """A real encoded store (synthetic DMLab, tiny VAE) so validation can decode and compare with the source clips."""
    from minisora.data.manifest import build_manifest
    from minisora.data.synthetic import write_synthetic_dataset
    from minisora.vae import build_vae, tiny_vae_config
    from stages.encode import EncodeConfig, main as encode

    write_synthetic_dataset("dmlab", tmp_path / "data", clips=4, test_clips=1, frames=16, seed=0, progress=False)
    m, _ = build_manifest(tmp_path / "data", "dmlab")
    m.save(tmp_path / "manifest.json")
    build_vae("AutoencoderKL", tiny_vae_config("kl")).model.save_pretrained(tmp_path / "vae")
    encode(EncodeConfig(manifest=str(tmp_path / "manifest.json"), vae=str(tmp_path / "vae"),
                        out=str(tmp_path / "store"), progress=False))
    run = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--store", str(tmp_path / "store"), "--out", str(run), "--frames", "4",
                                 "--batch-size", "2", "--steps", "2", "--ckpt-every", "0", "--sample-every", "2"])
    assert r.exit_code == 0, r.output
    assert "validation PSNR" in r.output
    gifs = sorted(p.name for p in (run / "samples").iterdir())
    assert gifs == ["step-00000002-test-0.gif"]
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_psnr" in line]
    assert len(val) == 1 and 0 < val[0]["val_psnr"] < 100 and 0 < val[0]["val_psnr_repeat_last"] < 100


def _train(store, run, *extra):
    return CliRunner().invoke(app, ["train", "--store", store, "--out", str(run), *TRAIN_ARGS, *extra])


def _records(run):
    return [json.loads(line) for line in Path(run, "metrics.jsonl").read_text().splitlines()]


def test_resume_with_a_changed_lr_is_honoured(store, tmp_path):
    run = tmp_path / "run"
    r = _train(store, run, "--steps", "2", "--ckpt-every", "2", "--lr-schedule", "constant")
    assert r.exit_code == 0, r.output
    assert "precision bf16: auto" in r.output or "precision fp32: auto" in r.output  # the choice, printed once
    r = _train(store, run, "--steps", "3", "--ckpt-every", "3", "--lr-schedule", "constant", "--lr", "5e-4")
    assert r.exit_code == 0, r.output
    assert "--lr 0.0005 replaces the checkpoint's 0.001: from step 2 on" in r.output
    lrs = {x["step"]: x["lr"] for x in _records(run) if "lr" in x}
    assert all(x["grad_norm"] > 0 for x in _records(run) if "loss" in x)  # ddp's norm before clipping, logged
    assert lrs[2] == pytest.approx(1e-3) and lrs[3] == pytest.approx(5e-4)
    assert json.loads((run / "checkpoints" / "step-00000003" / "state.json").read_text())["lr"] == 5e-4


def test_resume_to_an_older_checkpoint_is_refused_then_branches(store, tmp_path):
    run = tmp_path / "run"
    args = ["--steps", "4", "--ckpt-every", "2", "--keep-last", "0"]
    assert _train(store, run, *args).exit_code == 0
    old = _losses(run)
    step2 = run / "checkpoints" / "step-00000002"
    r = _train(store, run, *args, "--resume", str(step2))
    assert r.exit_code == 1
    assert "would overwrite the newer checkpoints step-00000004" in r.output and "--branch" in r.output
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]

    r = _train(store, run, *args, "--resume", str(step2), "--branch")
    assert r.exit_code == 0, r.output
    assert "newer checkpoints moved to" in r.output
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names[1:] == ["step-00000002", "step-00000004"] and names[0].startswith("abandoned-") and len(names) == 3
    assert (run / "checkpoints" / names[0] / "step-00000004" / "state.json").exists()
    records = _records(run)
    steps = [x["step"] for x in records if "loss" in x]
    assert steps == [1, 2, 3, 4]  # no step twice
    branch = [x for x in records if x.get("event") == "branch"]
    assert len(branch) == 1 and branch[0]["at_step"] == 2 and branch[0]["start"] == str(step2)
    assert _losses(run) == old  # same flags: the branch repeats the abandoned history exactly
    from minisora.run_dir import resolve_pipeline_dir

    assert resolve_pipeline_dir(run) == run / "checkpoints" / "step-00000004" / "pipeline"


def test_broken_checkpoints_are_one_line_errors(store, tmp_path):
    run = tmp_path / "run"
    assert _train(store, run, "--steps", "1", "--ckpt-every", "1").exit_code == 0
    ckpt = run / "checkpoints" / "step-00000001"
    (ckpt / "optimizer.bin").unlink()
    r = _train(store, run, "--steps", "2")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"{ckpt} has no optimizer/ or optimizer.bin: the checkpoint is incomplete" in r.output.replace("\n", "")
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "world_size"}))
    r = _train(store, run, "--steps", "2", "--resume", str(ckpt))
    assert r.exit_code == 1 and "state.json lacks world_size" in r.output.replace("\n", "")


def test_help_states_each_plugins_contract_and_the_new_options():
    import re

    r = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "400"})
    assert r.exit_code == 0
    text = re.sub(r"[\s│]+", " ", r.output)
    assert "none of it has run on a GPU yet" in text
    for plugin in ("ddp (cpu/cuda; fp32/bf16/fp16)", "zero1 (cuda;", "zero2 (cuda;", "gemini (cuda; bf16/fp16)"):
        assert plugin in text
    for part in ("clip:", "accumulate:", "EMA:", "checkpoint:", "--branch", "--compile", "--no-compile",
                 "[default: auto]"):
        assert part in text


def test_teacher_forcing_trains_a_causal_model_and_is_refused_for_full_attention(store, tmp_path):
    r = _train(store, tmp_path / "tf", "--steps", "3", "--ckpt-every", "3", "--attention", "causal",
               "--teacher-forcing", "1", "--use-actions")
    assert r.exit_code == 0, r.output
    losses = _losses(tmp_path / "tf")
    assert sorted(losses) == [1, 2, 3] and all(0 < v < 10 for v in losses.values())
    config = json.loads((tmp_path / "tf" / "config.json").read_text())
    assert config["flow"]["teacher_forcing"] == 1.0
    r = _train(store, tmp_path / "full", "--steps", "1", "--attention", "full", "--teacher-forcing", "0.5")
    assert r.exit_code != 0
    assert "--teacher-forcing 0.5 needs --attention causal" in r.output


def test_the_default_recipe_is_causal_with_teacher_forcing_and_context_noise(store, tmp_path):
    r = _train(store, tmp_path / "default", "--steps", "1", "--ckpt-every", "1")
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "default" / "config.json").read_text())
    assert config["attention"] == "causal"
    assert config["flow"]["teacher_forcing"] == 1.0 and config["flow"]["context_noise"] == 0.1
    assert config["flow"]["logit_mean"] == 0.5
    r = _train(store, tmp_path / "full", "--steps", "1", "--ckpt-every", "1", "--attention", "full")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "full" / "config.json").read_text())["flow"]["teacher_forcing"] == 0.0


def test_resuming_with_another_attention_is_refused_and_a_changed_recipe_announced(store, tmp_path):
    run = tmp_path / "run"
    r = _train(store, run, "--steps", "1", "--ckpt-every", "1", "--attention", "full")
    assert r.exit_code == 0, r.output
    r = _train(store, run, "--steps", "2", "--ckpt-every", "1")  # the default is causal now
    assert r.exit_code != 0
    assert "was trained with --attention full; this run has --attention causal" in r.output
    r = _train(store, run, "--steps", "2", "--ckpt-every", "1", "--attention", "full", "--logit-mean", "0")
    assert r.exit_code == 0, r.output
    assert "--logit-mean 0 replaces the checkpoint's 0.5 from step 1 on" in r.output


def test_a_truncated_optimizer_file_is_a_one_line_error_naming_it(store, tmp_path):
    run = tmp_path / "run"
    assert _train(store, run, "--steps", "1", "--ckpt-every", "1").exit_code == 0
    ckpt = run / "checkpoints" / "step-00000001"
    (ckpt / "digests.json").unlink()  # a checkpoint of an older minisora: nothing to catch the damage before torch
    opt = ckpt / "optimizer.bin"
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])
    r = _train(store, run, "--steps", "2", "--resume", str(ckpt))
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"{opt}: cannot be loaded (" in r.output.replace("\n", "")
    assert ckpt.is_dir()  # nothing moved or deleted
