"""The precision rule: bf16 only where the device computes it natively (probes mocked)."""

import warnings

import pytest
import torch

from minisora.hardware import CpuFacts, cpu_facts, cpu_model, resolve_precision

AVX2 = CpuFacts("AVX2", amx=False, avx512_bf16=False)
AMX = CpuFacts("AVX512", amx=True, avx512_bf16=True)
ZEN4 = CpuFacts("AVX512", amx=False, avx512_bf16=True)


@pytest.mark.parametrize("cpu, expected", [(AVX2, "fp32"), (AMX, "bf16"), (ZEN4, "bf16"),
                                           (CpuFacts("DEFAULT", False, False), "fp32")])
def test_auto_on_cpu_follows_native_bf16(cpu, expected):
    choice = resolve_precision("auto", "cpu", cpu=cpu)
    assert choice.precision == expected
    assert cpu.capability in choice.reason and choice.reason.startswith("auto:")
    assert choice.autocast_dtype == (torch.bfloat16 if expected == "bf16" else None)


@pytest.mark.parametrize("bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cuda(bf16, expected):
    assert resolve_precision("auto", "cuda", cuda_bf16=bf16).precision == expected


def test_explicit_bf16_on_avx2_runs_with_a_warning():
    with pytest.warns(UserWarning, match="many times slower"):
        choice = resolve_precision("bf16", "cpu", cpu=AVX2)
    assert choice.precision == "bf16"


def test_explicit_choices_on_native_hardware_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16", "cpu", cpu=AMX).precision == "bf16"
        assert resolve_precision("fp32", "cpu", cpu=AVX2).precision == "fp32"
        assert resolve_precision("fp16", "cuda", cuda_bf16=False).precision == "fp16"


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", "cpu", cpu=AVX2)


def test_probes_read_this_machine():
    facts = cpu_facts()
    assert facts.capability == str(torch.backends.cpu.get_cpu_capability())
    assert facts.describe().startswith("CPU capability ")


def test_cpu_model_names_this_machine():
    import os
    from pathlib import Path

    line = cpu_model()
    assert line.endswith(f", {os.cpu_count()} cores")
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # Linux: the first "model name" entry, as lscpu prints it
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        if names:
            assert line == f"{names[0]}, {os.cpu_count()} cores"
