#!/usr/bin/env bash
# Build the one folder benchmarks/gpu_check.py installs from on a GPU machine without network.
#
#   benchmarks/gpu_carry.sh [DIR]      (default: gpu-carry/, ignored by git; needs PyPI here)
#
# The GPU machine (Python 3.12, torch 2.11, numpy, transformers, huggingface-hub, safetensors, einops,
# typer, tqdm, rich, pyyaml, psutil, pillow, fsspec, ... already there) lacks only what is listed
# below: wheels for CPython 3.12 on manylinux x86_64, each downloaded with --no-deps so that pip never
# fetches torch, nvidia-*, triton, numpy or transformers (the script fails if one slipped in). ColossalAI
# 0.5.0 and contexttimer are sdists on PyPI: built here into pure-Python wheels, --no-deps (no kernels).
# ColossalAI's own pins (transformers 4.51, diffusers 0.29, ray, fastapi, ...) are not carried: importing
# colossalai.booster and its plugins needs none of them, but it does need galore-torch and bitsandbytes
# (colossalai.nn.optimizer imports both). Checked on 2026-12-06 by importing the carry, installed with
# --target, with every package the GPU machine lacks hidden (docs/benchmarks.md, "The GPU check").
# The folder must stay under 64 MiB (the device tool carries no more per call); gpu_check.py refuses more.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-gpu-carry}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
# what the GPU machine lacks, at the versions the CPU test suite passes with
WHEELS=(diffusers==0.42.1 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1
        google-crc32c==1.9.0 galore-torch==1.0 bitsandbytes==0.50.2)
SDISTS=(colossalai==0.5.0 contexttimer==0.3.3)
PLATFORM=(--only-binary=:all: --implementation cp --python-version 3.12 --abi cp312 --abi abi3 --abi none
          --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
          --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any)
rm -rf "$DIR"
mkdir -p "$DIR"
$PY -m pip download -q --no-deps --dest "$DIR" "${PLATFORM[@]}" "${WHEELS[@]}"
$PY -m pip wheel -q --no-deps --no-build-isolation --wheel-dir "$DIR" "${SDISTS[@]}"
if ls "$DIR" | grep -Eiq '^(torch|nvidia|triton|numpy|transformers)[-_]'; then
    echo "error: $DIR holds a wheel the GPU machine must keep its own of:" >&2
    ls "$DIR" | grep -Ei '^(torch|nvidia|triton|numpy|transformers)[-_]' >&2
    exit 1
fi
ls -1 "$DIR"
mib=$(du -sm "$DIR" | cut -f1)
echo "$(ls "$DIR" | wc -l) wheels, ${mib} MiB in $DIR (the device tool carries at most 64 MiB)"
[ "$mib" -le 64 ] || { echo "error: $DIR is over 64 MiB" >&2; exit 1; }
