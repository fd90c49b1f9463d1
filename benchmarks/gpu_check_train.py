"""Rows 4-5 of benchmarks/gpu_check.py: the default training path at a real size, and ColossalAI's plugins.

4. `train/eager`, `train/compiled`: our loop (stages.train build_run + train_step, the ddp plugin, a latent
   store from tests/_store_helpers.make_store), causal + teacher forcing in bf16, the blocks compiled as
   `minisora train` compiles them; `train/bare`: the same step as a bare PyTorch loop (model, loss, AdamW;
   benchmarks/train.py's training_step), the ceiling, with our loop's step time over it as `overhead`.
5. `colossal/ddp-bf16`, `colossal/zero2-bf16`: 3 steps of stages.train.main from the same seed;
   `colossal/ddp-resume`: a checkpoint at step 2 and a resume give steps 3 and 4 of the uninterrupted run.
CUDA: the base preset, 16x16 latents (patch 2), windows of 16 latent frames, batch 8, 10 timed steps.
--device cpu: the tiny preset, 8x8 latents, 4 frames, batch 2, 2 steps in fp32, no compile, ddp on gloo.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gpu_check_rows import Check

REPO = Path(__file__).resolve().parents[1]
PEAK_TFLOPS = 989.0  # H100/H200 SXM, dense bf16


@dataclass(frozen=True)
class Size:
    preset: str
    hw: int
    frames: int
    batch: int
    steps: int
    precision: str


def size_of(check: Check) -> Size:
    return Size("tiny", 8, 4, 2, 2, "fp32") if check.small else Size("base", 16, 16, 8, 10, "bf16")


def make_latent_store(check: Check, size: Size) -> str:
    """A complete store of random latents at the size's resolution (built once per OUT)."""
    path = check.out / "work" / f"store-{size.hw}"
    if not path.exists():
        sys.path.insert(0, str(REPO / "tests"))
        from _store_helpers import make_store

        make_store(path, {"train": [size.frames] * 4 * size.batch}, hw=(size.hw, size.hw),
                   clips_per_shard=size.batch)
    return str(path)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def _timed(step, steps: int, device: torch.device) -> dict:
    """Time the first step (compiles, if any), one more warm-up step, then `steps` steps one by one."""
    from torch._dynamo.utils import counters

    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - t0
    step()
    graphs = counters["stats"]["unique_graphs"]
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"first_step_s": first, "compile_s": max(0.0, first - median), "step_s": median, "steps": steps,
            "graphs": graphs, "recompiles_while_timed": counters["stats"]["unique_graphs"] - graphs,
            "graph_breaks": sum(counters["graph_break"].values())}


def _rates(fields: dict, module, size: Size, device: torch.device) -> None:
    from minisora.flops import train_step_flops

    flops = train_step_flops(module.config, size.frames, size.hw, size.hw, size.batch, "teacher_forcing")
    fields.update(step_tflop=flops.total / 1e12, tflops=flops.total / fields["step_s"] / 1e12,
                  windows_s=size.batch / fields["step_s"])
    if device.type == "cuda":
        fields.update(mfu=fields["tflops"] / PEAK_TFLOPS, peak_tflops=PEAK_TFLOPS)


def _cfg(check: Check, size: Size, out: str, **kw):
    from stages.train import TrainConfig

    base = dict(store=make_latent_store(check, size), out=out, model=size.preset, frames=size.frames,
                batch_size=size.batch, precision=size.precision, device=check.device.type, log_every=1,
                ckpt_every=0, warmup=1, lr_schedule="constant", cache_shards=2)
    return TrainConfig(**{**base, **kw})


def our_loop(check: Check, size: Size, compile_model: bool) -> dict:
    """Our loop's step (loader, ddp booster, EMA, clipping): stages.train build_run + train_step."""
    from minisora import plugins
    from minisora.dataset import WindowLoader
    from stages.train import build_run, train_step

    cfg = _cfg(check, size, str(check.out / "work" / "loop"), compile=compile_model, steps=size.steps + 2)
    device = plugins.launch(cfg.device)
    contract = plugins.check_combination(cfg.plugin, size.precision, device, cfg.ema_decay)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    run = build_run(cfg, contract, size.precision, device)
    loader = WindowLoader(run.sampler, pin_memory=device.type == "cuda")
    stats = (run.windows.stats_mean.to(device), run.windows.stats_std.to(device))
    run.model.train()
    counter = iter(range(10**6))
    try:
        fields = _timed(lambda: train_step(run, loader, next(counter), stats), size.steps, device)
    finally:
        loader.close()
    fields.update(_memory(device), preset=size.preset, latents=f"{size.frames}x4x{size.hw}x{size.hw}",
                  batch=size.batch, precision=size.precision, compiled=compile_model,
                  kernel=run.module.attention_kernel, attention="causal + teacher forcing")
    _rates(fields, run.module, size, device)
    return fields


def train_rows(check: Check) -> None:
    size = size_of(check)
    with check.row("train/eager") as r:
        r.update(our_loop(check, size, compile_model=False))
    if check.device.type != "cuda":
        check.skip("train/compiled", "--device cpu: compiling the blocks takes minutes on 2 cores")
        return
    with check.row("train/compiled") as r:
        r.update(our_loop(check, size, compile_model=True))


def bare_row(check: Check) -> None:
    """The ceiling: model, loss, AdamW on a batch already on the device; compiled where train/compiled was."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from train import training_step

    from minisora.model import VideoDiT

    size, compiled = size_of(check), check.device.type == "cuda"
    with check.row("train/bare") as r:
        torch.manual_seed(0)
        model = VideoDiT.from_preset(size.preset, in_channels=4, attention="causal").to(check.device)
        if compiled:
            model.compile_blocks()
        if check.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x0 = torch.randn(size.batch, size.frames, 4, size.hw, size.hw, device=check.device)
        dtype = torch.bfloat16 if size.precision == "bf16" else None
        r.update(_timed(training_step(model, opt, x0, dtype, teacher_forcing=True), size.steps, check.device))
        r.update(_memory(check.device), preset=size.preset, batch=size.batch, compiled=compiled,
                 kernel=model.attention_kernel)
        _rates(r, model, size, check.device)
        ours = _last_row(check, "train/compiled" if compiled else "train/eager")
        if ours and "step_s" in ours:
            r["overhead"] = ours["step_s"] / r["step_s"]  # our loop's step time over the bare loop's
            r["overhead_of"] = ours["row"]


def _last_row(check: Check, name: str) -> dict | None:
    rows = [json.loads(x) for x in (check.out / "results.jsonl").read_text().splitlines() if x.strip()]
    return next((x for x in reversed(rows) if x["row"] == name), None)


# ------------------------------------------------------------------------------ 5. ColossalAI
def _losses(run_dir: str) -> dict[int, float]:
    lines = Path(run_dir, "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def colossal_rows(check: Check) -> None:
    from stages.train import main

    size = Size("tiny", 8, 4, 2, 3, "bf16")  # the plugins' rows are about equality, not speed: tiny on CUDA too
    work = check.out / "work"
    first = {}
    for plugin in ("ddp", "zero2"):
        name = f"colossal/{plugin}-bf16"
        if plugin == "zero2" and check.device.type != "cuda":
            check.skip(name, "LowLevelZeroPlugin needs CUDA")
            continue
        with check.row(name) as r:
            cfg = _cfg(check, size, str(work / plugin), plugin=plugin, steps=3, compile=False, seed=0)
            result = main(cfg)
            losses = _losses(cfg.out)
            first[plugin] = losses[1]
            r.update(losses=losses, step=result["step"], backend="nccl" if check.device.type == "cuda" else "gloo")
            if "ddp" in first and plugin != "ddp":
                r["step1_diff_vs_ddp"] = abs(losses[1] - first["ddp"])
                r["pass"] = r["step1_diff_vs_ddp"] <= 2e-2
    with check.row("colossal/ddp-resume") as r:
        ref = _cfg(check, size, str(work / "ref"), steps=4, compile=False)
        cut = _cfg(check, size, str(work / "cut"), steps=4, compile=False, ckpt_every=2, keep_last=0)
        main(ref)
        main(cut.__class__(**{**cut.__dict__, "steps": 2}))  # stops after the checkpoint at step 2 ...
        main(cut)  # ... and the same command resumes it
        a, b = _losses(ref.out), _losses(cut.out)
        r.update(uninterrupted={k: a[k] for k in (3, 4)}, resumed={k: b.get(k) for k in (3, 4)})
        r["pass"] = r["equal"] = all(b.get(k) == a[k] for k in (3, 4))


GROUPS = {"train": train_rows, "bare": bare_row, "colossal": colossal_rows}
