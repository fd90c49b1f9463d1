#!/usr/bin/env bash
# The whole GPU check in one call, for a bare GPU machine (Python 3.12 + torch, no network):
#
#   benchmarks/gpu_check.sh [--install-only] LOGDIR [WHEELDIR]   (WHEELDIR: gpu-wheels/, from build_gpu_wheels.sh)
#
# 1. installs, offline and --no-deps, every wheel found under WHEELDIR (any part-*/ carried so far; the
#    folder holds the whole dependency closure but torch); --install-only stops here;
# 2. runs `pytest -m gpu` (tests/gpu/: every plugin, t, SDPA kernels, encode / vae train / sample / eval);
# 3. benchmarks/train.py --presets small,base --precision bf16 (MFU against 989 TFLOP/s, H100/H200 dense bf16);
# 4. the peak memory of base at batch 32, and the small step compiled (as training does on CUDA);
# 5. the Gemini tests, last, since ColossalAI JIT-builds HybridAdam's CUDA kernels (nvcc) on first use.
# Each phase has its own time limit (360 s in all, install included) and log in LOGDIR; summary.txt lists them.
# Without CUDA it says why and exits 0. The exit status is the number of phases that failed.
set -uo pipefail
INSTALL_ONLY=0
if [ "${1:-}" = "--install-only" ]; then INSTALL_ONLY=1; shift; fi
LOG=${1:?usage: benchmarks/gpu_check.sh [--install-only] LOGDIR [WHEELDIR]}
REPO=$(cd "$(dirname "$0")/.." && pwd)
WHEELS=${2:-$REPO/gpu-wheels}
PY=${PYTHON:-python3}
mkdir -p "$LOG"
LOG=$(cd "$LOG" && pwd)
SUMMARY=$LOG/summary.txt
: > "$SUMMARY"

why=$($PY - <<'PY' 2>&1
import sys
try:
    import torch
except Exception as e:  # no torch at all
    sys.exit(f"torch does not import ({e})")
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA GPU (torch.cuda.is_available() is False)")
PY
)
if [ $? -ne 0 ]; then
    echo "gpu_check: skipped: $why; nothing to check on this machine" | tee -a "$SUMMARY"
    exit 0
fi

failed=0
phase() {  # phase NAME SECONDS COMMAND...: run with a time limit, log to LOG/NAME.log, record the outcome
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit}s): $*"
    (cd "$REPO" && PYTHONUNBUFFERED=1 timeout "$limit" "$@") > "$LOG/$name.log" 2>&1
    rc=$?
    local line="$name: rc=$rc in $((SECONDS - t0))s$([ $rc -eq 124 ] && echo ' (time limit)') -> $LOG/$name.log"
    echo "$line" | tee -a "$SUMMARY"
    tail -n 25 "$LOG/$name.log"
    [ $rc -eq 0 ] || failed=$((failed + 1))
}

$PY -c "import torch; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| CUDA',
torch.version.cuda)" | tee -a "$SUMMARY"
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
if [ -n "$(find "$WHEELS" -name '*.whl' 2>/dev/null | head -1)" ]; then
    phase install 40 bash -c "find '$WHEELS' -name '*.whl' -print0 | xargs -0 $PY -m pip install --no-index --no-deps"
else
    echo "install: no wheels under $WHEELS; using what is installed" | tee -a "$SUMMARY"
fi
[ $INSTALL_ONLY -eq 1 ] && exit $failed
phase imports 15 $PY -c "import torch, diffusers, zarr, colossalai, minisora.plugins; print('imports ok:',
torch.__version__, diffusers.__version__, zarr.__version__, colossalai.__version__)"
phase pytest 130 $PY -m pytest -m gpu -q -rs -p no:cacheprovider --timeout 100 tests/gpu -k "not gemini"
phase bench 50 $PY benchmarks/train.py --presets small,base --precision bf16 --batch 8 --iters 5 --peak-tflops 989
phase memory 30 $PY benchmarks/train.py --presets base --datasets dmlab --batch 32 --iters 2 --precision bf16 \
    --peak-memory --skip-pixels-over 1
# training compiles the DiT by default on CUDA: the same small step, compiled (compile time excluded)
phase compile 45 $PY benchmarks/train.py --presets small --datasets dmlab --batch 8 --iters 5 --precision bf16 \
    --compile --skip-pixels-over 1
# last: Gemini needs ColossalAI's HybridAdam kernels, JIT-built (nvcc) on first use, which may not fit
phase gemini 50 $PY -m pytest -m gpu -q -rs -p no:cacheprovider --timeout 45 tests/gpu -k gemini
echo "gpu_check: $failed phase(s) failed; logs in $LOG" | tee -a "$SUMMARY"
exit $failed
