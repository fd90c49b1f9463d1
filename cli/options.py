"""Options that `minisora sample` and `minisora eval` share: one definition, one help text."""

from __future__ import annotations

import typer

# each call builds a fresh typer.Option, used as a parameter's default (typer reads its help from there)


def transformer_precision(default: str):
    return typer.Option(default, help="Transformer dtype: auto (bf16 only where the device computes it natively: "
                        "CUDA, or a CPU with AMX or AVX512-BF16; fp32 otherwise), fp32, bf16, fp16. The VAE stays "
                        "fp32.")


def kv_cache(default: str):
    return typer.Option(default, "--kv-cache", help="How a causal model rolls out: auto (= rolling), rolling (each "
                        "new frame's keys/values computed once and kept for window - chunk frames: fastest, "
                        "sliding-window attention over the history), window (context re-encoded once per window: "
                        "identical to the recompute).")


def attention_kernel(default: str):
    return typer.Option(default, help="Attention kernel of the transformer: auto (FlexAttention on CUDA, SDPA "
                        "elsewhere), sdpa or flex (compiled on first use, on CPU too).")


def no_kv_cache():
    return typer.Option(False, "--no-kv-cache", help="Recompute the whole window at every Euler step, as for "
                        "full-attention models (for comparison; slow).")
