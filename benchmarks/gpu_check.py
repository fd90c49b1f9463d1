"""The GPU check in one command, for a bare GPU machine (Python 3.12, torch 2.11, no network):

    benchmarks/gpu_carry.sh                      # here, once: gpu-carry/ (< 64 MiB of wheels)
    python3 benchmarks/gpu_check.py OUT [--device cuda|cpu] [--budget-s 360] [--carry gpu-carry]

1. Installs the carry's wheels with `pip install --no-index --no-deps --target SITE` (default
   /tmp/minisora-site) and puts SITE first on the children's PYTHONPATH: the machine's own packages
   (torch, numpy, transformers, ...) are never replaced. Refuses a carry over 64 MiB.
2. Runs the groups of rows in order, in a child process, each group under its own time limit and all
   within --budget-s: versions and kernels; attention parity (flex vs SDPA, CUDA vs CPU, three masks,
   fp32 and bf16, forward and gradients); model parity (CPU vs CUDA, KV-cache rollout vs recompute);
   the default training path at base size (eager, compiled, bare loop; MFU); ColossalAI ddp/zero2 and a
   ddp resume. Rows: benchmarks/gpu_check_rows.py and gpu_check_train.py.
3. Every row is appended to OUT/results.jsonl the moment it is measured; a group that overruns its limit
   is killed, recorded as a `<group>/timeout` row, and the next group runs in a fresh child. A failed row
   records its error and the group goes on.
4. Prints the rows as a table (also OUT/table.txt).

--device cpu runs every row that needs no CUDA, small (tiny preset, 4 frames), skipping the CUDA-only
comparisons with their reason, ddp on gloo; tests/test_gpu_check.py runs it. Gemini and the whole
tests/gpu suite are benchmarks/gpu_suite.sh, for a longer visit. Exit status: the number of rows with an
error, a timeout or a failed comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRY_LIMIT_MIB = 64
# (group, seconds on CUDA, seconds with --device cpu), the first including the child's imports; sums: 345 and 440.
# The CPU mode checks that the rows' code runs (in the test suite, on a machine that may be busy): its limits only
# stop a hang, at about 4x what each group takes on an idle 2-core CPU.
GROUPS = [("versions", 25, 60), ("attention", 60, 40), ("model", 40, 60), ("train", 135, 100), ("bare", 45, 60),
          ("colossal", 40, 120)]


# ------------------------------------------------------------------------------ the carry
def carry_wheels(carry: Path) -> list[Path]:
    """The carry's wheels; exits with a clear message when the folder is over the device tool's 64 MiB."""
    wheels = sorted(carry.glob("*.whl"))
    mib = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"carry {carry}: {len(wheels)} wheels, {mib:.1f} MiB (limit {CARRY_LIMIT_MIB} MiB)", flush=True)
    if mib > CARRY_LIMIT_MIB:
        sys.exit(f"gpu_check: {carry} holds {mib:.1f} MiB of wheels, over the {CARRY_LIMIT_MIB} MiB the device tool "
                 "carries per call; rebuild it with benchmarks/gpu_carry.sh")
    return wheels


def install(wheels: list[Path], site: Path) -> dict:
    """pip install the wheels into `site` alone (--target, --no-deps, offline); skipped when already there."""
    stamp, names = site / ".minisora-carry", "\n".join(w.name for w in wheels)
    if stamp.exists() and stamp.read_text() == names:
        return {"status": "ok", "site": str(site), "wheels": len(wheels), "note": "already installed"}
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade",
           "--disable-pip-version-check", "--target", str(site), *map(str, wheels)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        return {"status": "error", "error": (r.stdout + r.stderr)[-1500:], "site": str(site)}
    stamp.write_text(names)
    return {"status": "ok", "site": str(site), "wheels": len(wheels), "seconds": round(time.perf_counter() - t0, 1)}


def child_path(site: Path | None) -> str:
    parts = ([str(site)] if site else []) + [str(REPO), os.environ.get("PYTHONPATH", "")]
    return os.pathsep.join(p for p in parts if p)


# ------------------------------------------------------------------------------ the groups
def run_child(groups: list[str], args, env: dict) -> None:
    """In the child: each group in turn, a progress line before and after each."""
    sys.path.insert(0, str(REPO))
    import torch

    import gpu_check_rows
    import gpu_check_train

    torch.set_num_threads(min(torch.get_num_threads(), 2) if args.device == "cpu" else torch.get_num_threads())
    check = gpu_check_rows.Check(torch.device(args.device), Path(args.out))
    funcs = {**gpu_check_rows.GROUPS, **gpu_check_train.GROUPS}
    for group in groups:
        progress(args.out, group, "start")
        try:
            funcs[group](check)
        except Exception as e:  # a group's own crash outside its rows
            check.write(f"{group}/crashed", status="error", error=f"{type(e).__name__}: {e}"[:500])
        progress(args.out, group, "end")


def progress(out, group: str, event: str) -> None:
    with open(Path(out) / "progress.jsonl", "a") as f:
        f.write(json.dumps({"group": group, "event": event, "time": time.time()}) + "\n")
        f.flush()


def read_progress(out: Path) -> list[dict]:
    path = out / "progress.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def supervise(args, env: dict, deadline: float) -> None:
    """Run the groups in children, killing one whose group overruns its limit (or the budget), then going on
    with the next group in a fresh child."""
    limits = {g: (gpu if args.device == "cuda" else cpu) for g, gpu, cpu in GROUPS}
    pending = [g for g, _, _ in GROUPS]
    while pending:
        if deadline - time.time() < 3:
            write_row(args.out, f"{pending[0]}/skipped", status="timeout", reason="the budget is spent",
                      groups=pending)
            return
        cmd = [sys.executable, str(Path(__file__).resolve()), str(args.out), "--device", args.device,
               "--child", ",".join(pending)]
        seen = len(read_progress(args.out))
        with open(args.out / "child.log", "a") as log:  # the children's own output, for a crash's row
            child = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        pending = watch(child, args.out, seen, pending, limits, deadline)


def watch(child: subprocess.Popen, out: Path, seen: int, pending: list[str], limits: dict, deadline: float):
    """Wait for the child; returns the groups still to run."""
    started: dict[str, float] = {}
    while True:
        done = child.poll() is not None
        events = read_progress(out)[seen:]
        started.update({e["group"]: e["time"] for e in events if e["event"] == "start"})
        ended = {e["group"] for e in events if e["event"] == "end"}
        current = next((g for g in pending if g in started and g not in ended), None)
        if done:
            if current is not None or not started and child.returncode != 0:  # died inside a group, or before one
                write_row(out, f"{current or pending[0]}/crashed", status="error",
                          error=f"child exited with {child.returncode}: {log_tail(out)}")
            if not started:
                return []  # it cannot start: another child would not either
            return [g for g in pending if g not in ended and g != current]
        if current is not None:
            over = time.time() - started[current] > limits[current]
            if over or time.time() > deadline:
                kill(child)
                why = f"over its {limits[current]} s limit" if over else "over the --budget-s"
                write_row(out, f"{current}/timeout", status="timeout", reason=f"killed {why}")
                return [g for g in pending[pending.index(current) + 1:]]
        time.sleep(0.2)


def log_tail(out: Path, chars: int = 800) -> str:
    path = out / "child.log"
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def kill(child: subprocess.Popen) -> None:
    """End the child and what it started (its own process session)."""
    import signal

    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()


def write_row(out, name: str, **fields) -> None:
    with open(Path(out) / "results.jsonl", "a") as f:
        f.write(json.dumps({"row": name, "time": round(time.time(), 2), **fields}, default=str) + "\n")


# ------------------------------------------------------------------------------ the table
def summary(row: dict) -> str:
    keys = ("max_rel", "step_s", "compile_s", "mfu", "overhead", "tflops", "peak_allocated_gib", "graphs",
            "recompiles_while_timed", "step1_diff_vs_ddp", "equal", "torch", "triton", "diffusers", "zarr",
            "colossalai", "device", "auto_kernel", "flex_attention", "worst", "reason", "error")
    parts = []
    for k in keys:
        if k in row:
            v = row[k]
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)[:150]


def table(out: Path) -> tuple[str, int]:
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines() if x.strip()]
    lines = [f"{'row':<46}{'status':<9}{'pass':<6}summary"]
    bad = 0
    for r in rows:
        ok = r.get("pass")
        bad += r.get("status") in ("error", "timeout") or ok is False
        lines.append(f"{r['row']:<46}{r.get('status', ''):<9}{'' if ok is None else str(ok):<6}{summary(r)}")
    return "\n".join(lines), bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="folder for results.jsonl, table.txt and the work files")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--budget-s", type=float, default=360.0, help="the whole check, install included")
    ap.add_argument("--carry", type=Path, default=REPO / "gpu-carry", help="wheels from benchmarks/gpu_carry.sh")
    ap.add_argument("--site", type=Path, default=Path("/tmp/minisora-site"), help="where the wheels go (--target)")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: the groups a child process runs
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        return run_child(args.child.split(","), args, dict(os.environ))
    deadline = time.time() + args.budget_s
    site = None
    if args.carry.is_dir():
        wheels = carry_wheels(args.carry)
        row = install(wheels, args.site)
        write_row(args.out, "install", carry_mib=sum(w.stat().st_size for w in wheels) / 2**20, **row)
        site = args.site if row["status"] == "ok" else None
    else:
        write_row(args.out, "install", status="skipped", reason=f"no carry at {args.carry}: using what is installed")
    env = {**os.environ, "PYTHONPATH": child_path(site), "PYTHONUNBUFFERED": "1"}
    if args.device == "cuda":
        probe = subprocess.run([sys.executable, "-c", "import torch; assert torch.cuda.is_available()"], env=env,
                               capture_output=True)
        if probe.returncode != 0:
            sys.exit("gpu_check: torch sees no CUDA GPU here; use --device cpu")
    supervise(args, env, deadline)
    text, bad = table(args.out)
    (args.out / "table.txt").write_text(text + "\n")
    print(text)
    print(f"gpu_check: {bad} row(s) failed or timed out; rows in {args.out / 'results.jsonl'}")
    sys.exit(min(bad, 100))


if __name__ == "__main__":
    main()
