#!/usr/bin/env bash
# Build the wheel folder that benchmarks/gpu_check.sh installs from on a GPU machine without network.
#
#   benchmarks/build_gpu_wheels.sh [DIR] [PART_MIB]     (default: gpu-wheels/, ignored by git; 56)
#
# Downloads, for CPython 3.12 on manylinux x86_64 (glibc 2.31 or newer: Ubuntu 20.04+), the packages
# in benchmarks/gpu_wheels.txt with their dependencies and the torch-dependent ones in
# gpu_wheels_nodeps.txt without theirs, and builds colossalai 0.5.0 and contexttimer 0.3.3 (sdists)
# into pure-Python wheels with --no-deps. It never downloads torch, nvidia-* or triton (the GPU
# machine's torch 2.11 stays) and fails if one slipped in. Needs network (PyPI) here.
# The wheels (148 MiB on 2026-12-01) are then dealt into DIR/part-1, part-2, ... of at most PART_MIB each, since
# the device tool carries at most 64 MiB per call: install them part by part with
# `benchmarks/gpu_check.sh --install-only LOGDIR DIR` while the machine stays warm (docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-gpu-wheels}
PART_MIB=${2:-56}
PIP=${PIP:-"python3 -m pip"}
PLATFORM=(--only-binary=:all: --implementation cp --python-version 3.12 --abi cp312 --abi abi3 --abi none
          --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
          --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any)
mkdir -p "$DIR"
rm -rf "$DIR"/part-*   # a previous build's parts: the wheels are downloaded again and dealt anew
$PIP download --dest "$DIR" "${PLATFORM[@]}" -r benchmarks/gpu_wheels.txt
$PIP download --dest "$DIR" "${PLATFORM[@]}" --no-deps -r benchmarks/gpu_wheels_nodeps.txt
# sdists only on PyPI, pure Python: built into wheels here (no ColossalAI kernels are built)
$PIP wheel --no-deps --wheel-dir "$DIR" colossalai==0.5.0 contexttimer==0.3.3
if ls "$DIR" | grep -Eiq '^(torch|nvidia|triton)[-_]'; then
    echo "error: $DIR holds a torch/nvidia/triton wheel; the GPU machine's torch must stay:" >&2
    ls "$DIR" | grep -Ei '^(torch|nvidia|triton)[-_]' >&2
    exit 1
fi
# deal the wheels, largest first, into the first part they fit in
python3 - "$DIR" "$PART_MIB" <<'PY'
import sys
from pathlib import Path

root, limit = Path(sys.argv[1]), float(sys.argv[2]) * 2**20
wheels = sorted(root.glob("*.whl"), key=lambda p: p.stat().st_size, reverse=True)
parts: list[list[Path]] = []
for w in wheels:
    part = next((p for p in parts if sum(x.stat().st_size for x in p) + w.stat().st_size <= limit), None)
    if part is None:
        parts.append(part := [])
    part.append(w)
for i, part in enumerate(parts, 1):
    (root / f"part-{i}").mkdir(exist_ok=True)
    for w in part:
        w.rename(root / f"part-{i}" / w.name)
    size = sum(x.stat().st_size for x in (root / f"part-{i}").iterdir()) / 2**20
    print(f"part-{i}: {len(part)} wheels, {size:.1f} MiB")
PY
echo "$(find "$DIR" -name '*.whl' | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR"
