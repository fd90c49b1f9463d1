#!/usr/bin/env bash
# Build the wheel folder that benchmarks/gpu_check.sh installs from on a GPU machine without network.
#
#   benchmarks/build_gpu_wheels.sh [DIR]        (default: gpu-wheels/, ignored by git)
#
# Downloads, for CPython 3.12 on manylinux x86_64, the packages in benchmarks/gpu_wheels.txt with
# their dependencies, the torch-dependent ones in gpu_wheels_nodeps.txt without theirs, and builds
# colossalai 0.5.0 and contexttimer 0.3.3 (sdists) into pure-Python wheels with --no-deps. It never downloads torch, nvidia-*
# or triton (the GPU machine's torch 2.11 stays) and fails if one slipped in. Needs network (PyPI) here.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-gpu-wheels}
PIP=${PIP:-"python3 -m pip"}
PLATFORM=(--only-binary=:all: --implementation cp --python-version 3.12 --abi cp312 --abi abi3 --abi none
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any)
mkdir -p "$DIR"
$PIP download --dest "$DIR" "${PLATFORM[@]}" -r benchmarks/gpu_wheels.txt
$PIP download --dest "$DIR" "${PLATFORM[@]}" --no-deps -r benchmarks/gpu_wheels_nodeps.txt
# sdists only on PyPI, pure Python: built into wheels here (no ColossalAI kernels are built)
$PIP wheel --no-deps --wheel-dir "$DIR" colossalai==0.5.0 contexttimer==0.3.3
if ls "$DIR" | grep -Eiq '^(torch|nvidia|triton)[-_]'; then
    echo "error: $DIR holds a torch/nvidia/triton wheel; the GPU machine's torch must stay:" >&2
    ls "$DIR" | grep -Ei '^(torch|nvidia|triton)[-_]' >&2
    exit 1
fi
echo "$(ls "$DIR" | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR"
