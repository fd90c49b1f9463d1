#!/usr/bin/env bash
# The longer GPU visit, after benchmarks/gpu_check.py: the whole tests/gpu suite, Gemini last.
#
#   benchmarks/gpu_suite.sh LOGDIR [SITE]    (SITE: where gpu_check.py installed the carry, /tmp/minisora-site)
#
# Run gpu_check.py first in the same visit (it installs the carry into SITE); this only puts SITE first on
# PYTHONPATH. Gemini is last: ColossalAI JIT-builds HybridAdam's CUDA kernels (nvcc) on first use, which takes
# minutes. Each phase has its own time limit and log in LOGDIR; the exit status is the number that failed.
set -uo pipefail
LOG=${1:?usage: benchmarks/gpu_suite.sh LOGDIR [SITE]}
SITE=${2:-/tmp/minisora-site}
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$LOG"
export PYTHONPATH=$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
failed=0
phase() {  # phase NAME SECONDS COMMAND...
    local name=$1 limit=$2 rc
    shift 2
    (cd "$REPO" && timeout "$limit" "$@") > "$LOG/$name.log" 2>&1
    rc=$?
    echo "$name: rc=$rc$([ $rc -eq 124 ] && echo ' (time limit)') -> $LOG/$name.log"
    tail -n 15 "$LOG/$name.log"
    [ $rc -eq 0 ] || failed=$((failed + 1))
}
phase pytest 300 python3 -m pytest -m gpu -q -rs -p no:cacheprovider --timeout 120 tests/gpu -k "not gemini"
phase gemini 300 python3 -m pytest -m gpu -q -rs -p no:cacheprovider --timeout 280 tests/gpu -k gemini
exit $failed
