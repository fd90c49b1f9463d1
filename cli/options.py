"""Options that `minisora sample` and `minisora eval` share: one definition, one help text."""

from __future__ import annotations

import typer

# each call builds a fresh typer.Option, used as a parameter's default (typer reads its help from there)


def transformer_precision(default: str):
    return typer.Option(default, help="Transformer dtype: auto (bf16 only where the device computes it natively: "
                        "CUDA, or a CPU with AMX or AVX512-BF16; fp32 otherwise), fp32, bf16, fp16. The VAE stays "
                        "fp32.")


def kv_cache(default: str):
    return typer.Option(default, "--kv-cache", help="How a causal model rolls out: auto (rolling; window with "
                        "--context-noise > 0), rolling (each new frame's keys/values computed once and kept for "
                        "window - chunk frames: fastest, sliding-window attention over the history; clean context "
                        "only), window (context re-encoded once per window, noised as --context-noise says: "
                        "identical to the recompute).")


def context_noise(default: float):
    return typer.Option(default, min=0.0, max=0.99, help="Noise level t at which known (context and already "
                        "generated) frames are shown to the model; a model trained with --context-noise continues "
                        "better from a small one (0: clean).")


def attention_kernel(default: str):
    return typer.Option(default, help="Attention kernel of the transformer: auto (FlexAttention on CUDA, SDPA "
                        "elsewhere), sdpa or flex (compiled on first use, on CPU too).")


def compile_rollout(default: bool):
    return typer.Option(default, "--compile/--no-compile", help="torch.compile the transformer's passes once a "
                        "frame-by-frame rolling KV cache is full (the same shapes from then on): the first frame "
                        "after that waits for the compile (once per model and batch size; the tiny DiT on a 2-core "
                        "Intel Xeon: 15 s the first time, 5 s with inductor's kernel cache warm), later frames come "
                        "faster (1.4x there; docs/benchmarks.md). "
                        "Causal models, chunk 1, the rolling cache; worth it for long rollouts only.")


def no_kv_cache():
    return typer.Option(False, "--no-kv-cache", help="Recompute the whole window at every Euler step, as for "
                        "full-attention models (for comparison; slow).")


def sampler(default: str):
    return typer.Option(default, help="How each window integrates from noise: euler (the flow ODE, one model call per "
                        "step), heun (second order: 2 x steps - 1 calls; compare with euler at that many steps) or sde "
                        "(SiT's Euler-Maruyama: the ODE's velocity minus w(t) x score, plus noise; one call per step; "
                        "--sde-* options).")


def sde_diffusion(default: str):
    return typer.Option(default, help="--sampler sde: the diffusion coefficient w(t) (SiT's forms; t=1 noise): "
                        "constant, sbdm (score-based diffusion's reverse SDE: beta(t)/2 on vp), sigma (s(t), the "
                        "noise scale of the path), linear (t), decreasing (large at noise, 0 at data) or "
                        "increasing-decreasing (sin(pi t)^2: 0 at both ends).")


def sde_norm(default: float):
    return typer.Option(default, min=0.0, help="--sampler sde: the scale of w(t) (0: the Euler ODE sampler).")


def sde_last_step(default: str):
    return typer.Option(default, help="--sampler sde: the last step, into t = 0, adds no noise: mean (the SDE's "
                        "drift), tweedie (the model's estimate of the clean latents, E(x0 | x_t)) or euler (the "
                        "ODE's step).")
