"""Hardware facts that decide how a stage runs: the precision rule, in one place.

`--precision auto` (the default of train, vae train, sample, eval and the demo) picks bf16 only
where the device computes it natively, and fp32 everywhere else:

- CUDA: bf16 when the GPU supports it (Ampere and newer), with TF32 for what stays fp32;
  otherwise fp32.
- CPU: bf16 when torch reports AMX tiles or AVX-512-BF16 (oneDNN then runs bf16 matmuls in
  hardware); otherwise fp32. On an AVX2-only CPU bf16 is emulated: a tiny DiT step was measured
  11.7x slower than fp32 on an AMD EPYC with AVX2 (docs/benchmarks.md).

An explicit `--precision bf16` on a CPU without native bf16 still runs, with a warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class CpuFacts:
    capability: str  # torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512, ...
    amx: bool
    avx512_bf16: bool

    @property
    def native_bf16(self) -> bool:
        return self.amx or self.avx512_bf16

    def describe(self) -> str:
        extras = [name for name, on in (("AMX", self.amx), ("AVX512-BF16", self.avx512_bf16)) if on]
        return f"CPU capability {self.capability}" + (f" + {', '.join(extras)}" if extras else "")


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # fp32 | bf16 | fp16
    reason: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for fp32 (autocast off)."""
        return _DTYPES[self.precision]

    def line(self) -> str:
        return f"precision {self.precision}: {self.reason}"


def cpu_facts() -> CpuFacts:
    """What torch reports about this CPU (each probe is False where torch lacks it)."""
    def probe(fn_name: str) -> bool:
        fn = getattr(torch.cpu, fn_name, None)
        try:
            return bool(fn()) if fn is not None else False
        except Exception:  # an old torch or an exotic platform: treat as absent
            return False

    return CpuFacts(capability=str(torch.backends.cpu.get_cpu_capability()),
                    amx=probe("_is_amx_tile_supported"), avx512_bf16=probe("_is_avx512_bf16_supported"))


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, platform.processor() elsewhere) and its core count: what a
    printed timing needs to say which machine it came from."""
    import os
    import platform

    name = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def cuda_bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_precision(requested: str, device: torch.device | str, cpu: CpuFacts | None = None,
                      cuda_bf16: bool | None = None) -> PrecisionChoice:
    """The precision to run with on `device`, and why. `cpu` and `cuda_bf16` override the probes
    (tests pass them; callers leave them None)."""
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; choose one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if device.type == "cuda":
        bf16_ok = cuda_bf16_supported() if cuda_bf16 is None else cuda_bf16
        if requested != "auto":
            return PrecisionChoice(requested, "asked for on CUDA (TF32 for fp32 matmuls)")
        if bf16_ok:
            return PrecisionChoice("bf16", "auto: this CUDA GPU computes bf16 natively (TF32 for what stays fp32)")
        return PrecisionChoice("fp32", "auto: this CUDA GPU has no native bf16 (TF32 where it has it)")
    cpu = cpu_facts() if cpu is None else cpu
    if requested == "auto":
        if cpu.native_bf16:
            return PrecisionChoice("bf16", f"auto: {cpu.describe()} computes bf16 natively")
        return PrecisionChoice("fp32", f"auto: {cpu.describe()} has no native bf16 (no AMX, no AVX512-BF16)")
    if requested in ("bf16", "fp16") and not cpu.native_bf16:
        warnings.warn(f"--precision {requested} on a CPU without native bf16/fp16 ({cpu.describe()}): it is "
                      "emulated and runs many times slower than fp32 (11.7x measured on an AVX2-only EPYC); "
                      "use --precision auto or fp32", stacklevel=2)
        return PrecisionChoice(requested, f"asked for; emulated on {cpu.describe()}, expect it many times slower")
    return PrecisionChoice(requested, f"asked for on {cpu.describe()}")


def flush_denormals() -> None:
    """Flush denormal floats to zero: they made CPU convolutions and matmuls about 30x slower in `vae train`.
    The CLI calls this once for every command (cli/main.py); call it yourself when driving a stage from Python."""
    torch.set_flush_denormal(True)


def enable_tf32() -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA (a no-op on CPU-only machines)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device | str, choice: PrecisionChoice):
    """torch.autocast for the choice (disabled for fp32)."""
    device = torch.device(device)
    dtype = choice.autocast_dtype
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
