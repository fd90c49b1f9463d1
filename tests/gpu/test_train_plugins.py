"""Stage two on CUDA with every plugin: 4 steps of a tiny DiT on a tiny store, in process (a world of one).

For ddp, zero1, zero2 and gemini in bf16, and ddp in fp16: the loss is finite, the EMA moved and lives on
the GPU, the gradient norm the optimizer steps with is at most --grad-clip, and the losses at steps 3 and 4
after a checkpoint at step 2 and a resume equal the uninterrupted run's: bitwise for ddp; within RESUME_REL for
ZeRO and Gemini, tight enough to see fp32 master weights reloaded through bf16.
"""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

CASES = [("ddp", "bf16"), ("zero1", "bf16"), ("zero2", "bf16"), ("gemini", "bf16"), ("ddp", "fp16")]
CLIP = 0.05  # small enough that the tiny DiT's gradients are clipped at every step
# Step 3's loss comes before any update after the resume, from the bf16 working weights, which a reload of the
# fp32 masters through bf16 leaves as they were; step 4's comes after one update, where such a reload moves about
# a fifth of the working weights by one bf16 ulp. At lr 1e-3 that changes the step-4 loss by ~1e-5 relative
# (1.2e-5 for seed 0; 6e-7 to 1.2e-5 over seeds 0-4, measured on CPU with ddp bf16 and its weights rounded to bf16
# at the resume). 1e-6 still catches it at seed 0 and leaves a correct resume ~16 float32 ulps of a loss near 2.
RESUME_REL = 1e-6


def _cfg(store, out, plugin, precision, **kw):
    from stages.train import TrainConfig

    # a constant schedule, so that the 2-step run of the resume test has the 4-step run's learning rates
    return TrainConfig(store=store, out=str(out), frames=4, batch_size=2, steps=4, warmup=1, lr=1e-3, log_every=1,
                       lr_schedule="constant",
                       plugin=plugin, precision=precision, grad_clip=CLIP, compile=False, device="cuda",
                       ema_decay=0.0 if plugin == "gemini" else 0.5, **kw)


def _losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, Path(run, "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


@pytest.mark.parametrize("plugin,precision", CASES)
def test_plugin_trains_clips_and_keeps_ema_on_gpu(gpu_store, tmp_path, plugin, precision):
    from minisora import plugins
    from minisora.dataset import WindowLoader
    from stages.train import build_run, train_step

    cfg = _cfg(gpu_store, tmp_path / "run", plugin, precision)
    device = plugins.launch("cuda")
    contract = plugins.check_combination(plugin, precision, device, cfg.ema_decay)
    run = build_run(cfg, contract, precision, device)
    start = {k: v.clone() for k, v in run.ema.state_dict().items()} if run.ema is not None else {}
    inner = run.optimizer.optim  # the torch/HybridAdam optimizer the plugin steps after clipping
    seen, step_fn = [], inner.step

    def spy(*args, **kwargs):
        grads = [p.grad.float().norm() for g in inner.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack(grads))))
        return step_fn(*args, **kwargs)

    inner.step = spy
    loader = WindowLoader(run.sampler)
    stats = (run.windows.stats_mean.to(device), run.windows.stats_std.to(device))
    run.model.train()
    losses, norms = [], []
    try:
        for step in range(4):
            loss, norm = train_step(run, loader, step, stats)
            losses.append(float(loss))
            norms.append(float(norm))
    finally:
        loader.close()
    assert all(math.isfinite(x) for x in losses), losses
    assert max(norms) > CLIP  # clipping had something to do
    assert len(seen) >= 2 and max(seen) <= CLIP * 1.01, seen  # fp16 may skip a step on overflow
    if run.ema is not None:
        assert run.ema.device.type == "cuda" and all(v.is_cuda for v in run.ema.state_dict().values())
        assert any(not torch.equal(v, start[k]) for k, v in run.ema.state_dict().items())  # the EMA moved


@pytest.mark.parametrize("plugin,precision", CASES)
def test_resume_repeats_the_uninterrupted_run(gpu_store, tmp_path, plugin, precision):
    from stages.train import main

    ref = main(_cfg(gpu_store, tmp_path / "ref", plugin, precision, ckpt_every=0))
    assert ref["step"] == 4
    if plugin != "gemini":
        assert ref["ema_device"].startswith("cuda")
    cut = _cfg(gpu_store, tmp_path / "cut", plugin, precision, ckpt_every=2, keep_last=0)
    main(replace(cut, steps=2))  # stops after the checkpoint at step 2 ...
    assert main(cut)["step"] == 4  # ... and the same command resumes it
    a, b = _losses(tmp_path / "ref"), _losses(tmp_path / "cut")
    assert sorted(b) == [1, 2, 3, 4]
    if plugin == "ddp":
        assert b[3] == a[3] and b[4] == a[4]
    else:  # step 3: the working weights as saved; step 4: one update from the reloaded fp32 masters
        assert b[3] == pytest.approx(a[3], rel=RESUME_REL) and b[4] == pytest.approx(a[4], rel=RESUME_REL), (a, b)


def test_device_cpu_is_honoured_on_a_cuda_machine(gpu_store, tmp_path):
    """A fresh process (ColossalAI's accelerator is chosen once per process): no GPU memory, gloo, CPU batches.
    Its environment has no torchrun variables: the tests above left this process's MASTER_PORT in os.environ."""
    import os
    import subprocess
    import sys

    from minisora import plugins

    cmd = [sys.executable, "-m", "cli.main", "train", "--store", gpu_store, "--out", str(tmp_path / "run"),
           "--frames", "4", "--batch-size", "2", "--steps", "2", "--ckpt-every", "2", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=plugins.fresh_world_env(dict(os.environ)))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "on cpu, plugin ddp" in r.stdout and "precision" in r.stdout and "CPU capability" in r.stdout
