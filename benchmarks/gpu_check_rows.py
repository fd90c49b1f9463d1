"""Rows 1-3 of benchmarks/gpu_check.py: versions, attention parity, model parity; and the row writer.

Each group is a function of a `Check` (device, sizes, the results file). A row is one JSON line, appended
and flushed the moment it is measured, so a group killed at its time limit keeps what it wrote; a row
that raises is written with its error and the group goes on (`Check.row`).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

FP32_TOL, BF16_TOL = 1e-4, 2e-2  # max |a - b| / max |reference|


@dataclass
class Check:
    device: torch.device
    out: Path  # OUT/results.jsonl is appended to

    @property
    def small(self) -> bool:  # --device cpu: small sizes, no CUDA-only comparisons
        return self.device.type == "cpu"

    def write(self, name: str, **fields) -> dict:
        row = {"row": name, "time": round(time.time(), 2), **fields}
        with open(self.out / "results.jsonl", "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return row

    def skip(self, name: str, reason: str) -> dict:
        return self.write(name, status="skipped", reason=reason)

    @contextmanager
    def row(self, name: str):
        """Run the body, which fills `fields`; write them as the row `name`, or the error if the body raised."""
        fields: dict = {}
        t0 = time.perf_counter()
        try:
            yield fields
        except Exception as e:  # recorded, and the group goes on
            tail = traceback.format_exc().strip().splitlines()[-6:]
            self.write(name, status="error", error=f"{type(e).__name__}: {e}"[:500], trace=tail,
                       seconds=round(time.perf_counter() - t0, 2))
        else:
            fields.setdefault("status", "ok")
            self.write(name, seconds=round(time.perf_counter() - t0, 2), **fields)


def compare(a: torch.Tensor, ref: torch.Tensor) -> dict:
    """Max absolute error and the same over max |ref| (the "rel" every tolerance here is on)."""
    diff = (a.detach().float().cpu() - ref.detach().float().cpu()).abs().max().item()
    scale = ref.detach().float().abs().max().item()
    return {"max_abs": diff, "max_rel": diff / max(scale, 1e-12)}


def worst(results: dict[str, dict]) -> dict:
    """The largest error among named comparisons, and its name."""
    name = max(results, key=lambda k: results[k]["max_rel"])
    return {"worst": name, **results[name]}


# ------------------------------------------------------------------------------ 1. versions
def versions(check: Check) -> None:
    with check.row("versions") as r:
        r.update(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                 device=torch.cuda.get_device_name() if check.device.type == "cuda" else platform.processor() or "cpu")
        for name in ("triton", "diffusers", "zarr", "colossalai", "numpy", "transformers"):
            try:
                r[name] = __import__(name).__version__
            except Exception as e:  # a missing package is a finding, not a crash
                r[name] = f"missing ({type(e).__name__}: {e})"[:200]
        r["sys_path_head"] = sys.path[:3]
    with check.row("kernels") as r:
        from minisora import attention

        r["flex_attention"] = attention.flex_available()
        if check.device.type == "cuda":
            b = torch.backends.cuda
            r.update(sdpa_flash=b.flash_sdp_enabled(), sdpa_mem_efficient=b.mem_efficient_sdp_enabled(),
                     sdpa_cudnn=b.cudnn_sdp_enabled(), sdpa_math=b.math_sdp_enabled(),
                     auto_kernel=attention.resolve_kernel("auto", check.device),
                     capability=".".join(map(str, torch.cuda.get_device_capability())))
        else:
            r["auto_kernel"] = attention.resolve_kernel("auto", check.device)


# ------------------------------------------------------------------------------ 2. attention parity
def _masks(frames: int, tokens: int, device, kernel: str):
    from minisora import attention

    half = frames // 2
    return {"causal": attention.causal_mask(0, frames, tokens, device, kernel),
            "teacher_forcing": attention.teacher_forcing_mask(frames, tokens, device, kernel),
            # KV cache: queries of the later frames against the cached earlier ones and themselves
            "kv_cache": attention.causal_mask(half, frames - half, tokens, device, kernel)}


def _attend_with_grads(q, k, v, mask, dtype, device):
    """Output and (dq, dk, dv) of attend() on copies of q, k, v in `dtype` on `device`; grads of a fixed
    random projection of the output, so every output element matters."""
    from minisora.attention import attend

    leaves = [x.detach().to(device, dtype).requires_grad_() for x in (q, k, v)]
    out = attend(*leaves, mask)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    (out * weight).sum().backward()
    return out, [x.grad for x in leaves]


def attention_parity(check: Check) -> None:
    frames, tokens, heads, head_dim = (4, 16, 2, 16) if check.small else (4, 64, 4, 64)
    g = torch.Generator().manual_seed(0)
    shapes = {"causal": frames, "teacher_forcing": 2 * frames, "kv_cache": frames - frames // 2}
    cpu = torch.device("cpu")
    ref_masks = _masks(frames, tokens, cpu, "sdpa")
    for mask_name, q_frames in shapes.items():
        k_frames = frames if mask_name != "teacher_forcing" else 2 * frames
        q = torch.randn(2, heads, q_frames * tokens, head_dim, generator=g)
        k, v = (torch.randn(2, heads, k_frames * tokens, head_dim, generator=g) for _ in range(2))
        ref_out, ref_grads = _attend_with_grads(q, k, v, ref_masks[mask_name], torch.float32, cpu)
        for dtype, tol in ((torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)):
            name = f"attention/{mask_name}/{'fp32' if dtype == torch.float32 else 'bf16'}"
            if check.device.type != "cuda":
                check.skip(name, "needs CUDA: flex vs SDPA and CUDA vs CPU (FlexAttention on CPU has no backward)")
                continue
            with check.row(name) as r:
                r.update(_cuda_parity(q, k, v, mask_name, frames, tokens, dtype, ref_out, ref_grads), tol=tol)
                r["pass"] = r["max_rel"] <= tol
        if check.device.type != "cuda":  # the CPU check of the same masks: SDPA against a dense reference
            with check.row(f"attention/{mask_name}/cpu-sdpa-vs-matmul") as r:
                r.update(_sdpa_vs_matmul(q, k, v, ref_masks[mask_name].sdpa, ref_out, ref_grads))
                r["pass"] = r["max_rel"] <= FP32_TOL


def _cuda_parity(q, k, v, mask_name, frames, tokens, dtype, ref_out, ref_grads) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 here
    cuda = torch.device("cuda")
    results, runs = {}, {}
    for kernel in ("sdpa", "flex"):
        runs[kernel] = _attend_with_grads(q, k, v, _masks(frames, tokens, cuda, kernel)[mask_name], dtype, cuda)
    for what, i in (("out", None), ("dq", 0), ("dk", 1), ("dv", 2)):
        pick = (lambda run: run[0]) if i is None else (lambda run, i=i: run[1][i])
        ref = ref_out if i is None else ref_grads[i]
        results[f"flex-vs-sdpa/{what}"] = compare(pick(runs["flex"]), pick(runs["sdpa"]))
        results[f"cuda-vs-cpu/{what}"] = compare(pick(runs["sdpa"]), ref)
        results[f"flex-vs-cpu/{what}"] = compare(pick(runs["flex"]), ref)
    return {**worst(results), "all": results}


def _sdpa_vs_matmul(q, k, v, allowed, ref_out, ref_grads) -> dict:
    """attend()'s CPU SDPA against attention as two matmuls under the same bool mask."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    scores = (leaves[0] @ leaves[1].transpose(-2, -1) / q.shape[-1] ** 0.5).masked_fill(~allowed, float("-inf"))
    out = scores.softmax(-1) @ leaves[2]
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    results = {"out": compare(ref_out, out), **{f"d{n}": compare(g, x.grad)
                                                 for n, g, x in zip("qkv", ref_grads, leaves)}}
    return worst(results)


# ------------------------------------------------------------------------------ 3. model parity
def random_causal_dit(seed: int = 0, depth: int = 2, hidden: int = 64, heads: int = 2):
    """A small causal DiT with its zero-initialised layers (adaLN, final layer) randomised: a fresh one predicts 0."""
    from minisora.model import VideoDiT

    torch.manual_seed(seed)
    model = VideoDiT(in_channels=4, hidden_size=hidden, depth=depth, num_heads=heads, attention="causal")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_layer"):
                p.normal_(0.0, 0.2)
    return model


def _tf_forward_backward(model, device, x, t, clean):
    model = model.to(device)
    model.zero_grad(set_to_none=True)
    v = model(x.to(device), t.to(device), clean=clean.to(device))
    v.square().mean().backward()
    return v, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def model_parity(check: Check) -> None:
    g = torch.Generator().manual_seed(0)
    x, clean = torch.randn(2, 4, 4, 8, 8, generator=g), torch.randn(2, 4, 4, 8, 8, generator=g)
    t = torch.rand(2, 4, generator=g)
    if check.device.type != "cuda":
        check.skip("model/cpu-vs-cuda", "needs CUDA (the same model on CPU and CUDA)")
    else:
        with check.row("model/cpu-vs-cuda") as r:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            v_cpu, g_cpu = _tf_forward_backward(random_causal_dit(), torch.device("cpu"), x, t, clean)
            v_gpu, g_gpu = _tf_forward_backward(random_causal_dit(), check.device, x, t, clean)
            grads = {n: compare(g_gpu[n], g_cpu[n]) for n in g_cpu}
            r.update(velocity=compare(v_gpu, v_cpu), grads_worst=worst(grads), params=len(grads),
                     kernel=random_causal_dit().attention_kernel, tol=FP32_TOL)
            r["pass"] = max(r["velocity"]["max_rel"], r["grads_worst"]["max_rel"]) <= FP32_TOL
    with check.row("model/kv-cache-rollout") as r:
        r.update(_kv_rollout(check.device))
        r["pass"] = r["max_abs"] <= FP32_TOL


def _kv_rollout(device: torch.device) -> dict:
    """A chunk-1 rollout over 2 (CPU) or 3 windows, with the per-window KV cache against the window recompute
    (as tests/test_kvcache.py compares them)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from minisora.pipeline import DiTPipeline
    from minisora.vae import build_vae, tiny_vae_config

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    vae = build_vae("kl", tiny_vae_config("kl")).model
    pipe = DiTPipeline(random_causal_dit(hidden=32), vae, FlowMatchEulerDiscreteScheduler(shift=1.0), window_frames=4,
                       latent_size=[4, 4]).to(device)
    pipe.set_progress_bar_config(disable=True)
    ctx = torch.randn(1, 2, 4, 4, 4, generator=torch.Generator().manual_seed(1)).to(device)
    frames = 8 if device.type == "cpu" else 12  # 2 or 3 windows of 4
    out = {}
    for mode in ("off", "window"):
        out[mode] = pipe(context_latents=ctx, num_frames=frames, num_inference_steps=2, chunk=1, kv_cache=mode,
                         progress=False, generator=torch.Generator(device).manual_seed(0), output_type="latent").latents
    return {**compare(out["window"], out["off"]), "frames": frames, "window": 4, "tol": FP32_TOL}


GROUPS = {"versions": versions, "attention": attention_parity, "model": model_parity}
