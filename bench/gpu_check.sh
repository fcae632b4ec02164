#!/usr/bin/env bash
# The GPU fast path check of issue #10, from the repository root:  bash bench/gpu_check.sh
#
# Without a CUDA device it prints "no GPU: skipped" and exits 0.  On a GPU it prints the device and
# the table of bench/bench_sampling.py's full run: 1000 guided digits with the `full` profile's model
# (untrained weights: the timing does not depend on them), DDPM-1000 and DDIM-50 with batched guidance,
# bf16 autocast, channels_last and fixed shapes, against the seed recipe (two float32 forwards per
# step) timed over 50 of its 1000 steps and scaled; then whether the targets are met (one H200-class
# GPU: DDPM-1000 < 30 s, DDIM-50 < 3 s).  Under 5 minutes: the run is cut at GPU_CHECK_LIMIT seconds.
#
#   PYTHON=...            the interpreter (default .venv/bin/python, else python3)
#   GPU_CHECK_COMPILE=1   also the same table with torch.compile (adds compile time: minutes)
#   GPU_CHECK_LIMIT=280   seconds allowed for the benchmark run(s) in all
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
LIMIT="${GPU_CHECK_LIMIT:-280}"

if ! avail=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))'); then
    echo "error: $PY cannot import torch (run make setup, or set PYTHON)" >&2
    exit 1
fi
if [ "$avail" != 1 ]; then
    echo "no GPU: skipped (torch sees no CUDA device; the GPU benchmarks of bench/gpu_check.sh did not run)"
    exit 0
fi

"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")'

start=$SECONDS
run() {
    local left=$((LIMIT - (SECONDS - start)))
    if [ "$left" -le 10 ]; then
        echo "skipped (the ${LIMIT} s budget is spent): $*"
        return 0
    fi
    PYTHONUNBUFFERED=1 timeout "$left" "$PY" bench/bench_sampling.py --device cuda --profile full --images 1000 --ddim-steps 50 \
        --ddpm-steps 50 --targets "$@"
    local rc=$?
    if [ "$rc" -eq 124 ]; then echo "timed out after ${left} s: $*"; fi
    return "$rc"
}

echo
run
rc=$?
if [ "${GPU_CHECK_COMPILE:-0}" = 1 ]; then
    echo
    run --compile || rc=$?
fi
echo
echo "gpu_check: $((SECONDS - start)) s"
exit "$rc"
