"""benchmarks/gpu_check.py --device cpu, as a user runs it (a subprocess): every row that needs no CUDA runs
small, the CUDA-only ones are skipped with their reason, and no row fails or times out."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# set by plugins.launch in this process when a training test ran first: the check's own world of one must not
# try to listen on this process's MASTER_PORT
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
CUDA_ONLY = ["attention/causal/fp32", "attention/teacher_forcing/bf16", "attention/kv_cache/fp32",
             "model/cpu-vs-cuda", "train/compiled", "colossal/zero2-bf16"]


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), str(out), "--device", "cpu",
                        "--carry", str(out / "no-carry"), "--budget-s", "600"],
                       capture_output=True, text=True, timeout=660, env=env)
    rows = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["row"]] = row
    return r, rows, out


@pytest.mark.slow
def test_cpu_mode_runs_every_row_it_can(check):
    r, rows, out = check
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert list(rows)[:3] == ["install", "versions", "kernels"]
    assert rows["versions"]["colossalai"] == "0.5.0" and rows["kernels"]["auto_kernel"] == "sdpa"
    for name in CUDA_ONLY:
        assert rows[name]["status"] == "skipped" and rows[name]["reason"], rows[name]
    for mask in ("causal", "teacher_forcing", "kv_cache"):
        assert rows[f"attention/{mask}/cpu-sdpa-vs-matmul"]["pass"] is True
    assert rows["model/kv-cache-rollout"]["pass"] is True
    assert not any(row.get("status") in ("error", "timeout") for row in rows.values()), rows
    assert "train/bare" in r.stdout and (out / "table.txt").read_text().startswith("row")


@pytest.mark.slow
def test_cpu_mode_training_rows_have_their_figures(check):
    _, rows, _ = check
    eager, bare = rows["train/eager"], rows["train/bare"]
    for row in (eager, bare):
        assert row["status"] == "ok" and row["step_s"] > 0 and row["step_tflop"] > 0 and row["tflops"] > 0
        assert row["steps"] == 2 and row["graphs"] == 0  # eager: nothing compiled
    assert eager["attention"] == "causal + teacher forcing" and eager["kernel"] == "auto"
    assert bare["overhead_of"] == "train/eager" and bare["overhead"] == pytest.approx(eager["step_s"] / bare["step_s"])
    ddp, resume = rows["colossal/ddp-bf16"], rows["colossal/ddp-resume"]
    assert ddp["backend"] == "gloo" and ddp["step"] == 3 and sorted(ddp["losses"]) == ["1", "2", "3"]
    assert resume["equal"] is True and resume["resumed"] == resume["uninterrupted"]


def test_a_carry_over_64_mib_is_refused(tmp_path):
    carry = tmp_path / "carry"
    carry.mkdir()
    with open(carry / "big-1.0-py3-none-any.whl", "wb") as f:
        f.truncate(65 * 2**20)  # sparse: no disk used
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), str(tmp_path / "out"), "--device",
                        "cpu", "--carry", str(carry)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "65.0 MiB of wheels, over the 64 MiB the device tool carries per call" in r.stderr
