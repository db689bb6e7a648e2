#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run that fits a short lease of a GPU machine: what the machine
# has, the cuda-marked tests, the training overhead and attention benchmarks on the GPU, then the whole
# suite with the GPU present (DualInference(device=None) picks CUDA there). Each stage has a time limit
# and its own log; a stage that fails or runs out of time does not stop the next one.
#
#   DATA=/path/to/fashion_mnist_npm70k.npz OUT=/tmp/gpu-check benchmarks/gpu_check.sh
#
# Uses the python3 on PATH as it is (its torch, lightning, h5py): the library runs from src/, uninstalled.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
DATA=${DATA:-../shared/data/fashion_mnist_npm70k.npz}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SECONDS=0

stage() {  # stage NAME LIMIT_S LINES_SHOWN COMMAND...
    local name=$1 limit=$2 lines=$3
    shift 3
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1  # (-k: a process that survives SIGTERM, e.g. under Lightning's handler)
    local rc=$?
    echo "== $name: rc $rc, $((SECONDS - t0)) s (limit $limit s; elapsed $SECONDS s)"
    tail -n "$lines" "$OUT/$name.log"
}

stage env 60 12 bash -c '
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch, lightning, h5py, numpy; print(\"torch\", torch.__version__, \"lightning\", lightning.__version__, \"h5py\", h5py.__version__, \"hdf5\", h5py.version.hdf5_version, \"numpy\", numpy.__version__, torch.cuda.get_device_name(0))"
    echo "cores $(nproc)"; free -g | head -2; df -h /tmp | tail -1'
stage cuda_tests 180 15 python3 -m pytest -q -p no:cacheprovider -m cuda -rs tests
stage overhead "${OVERHEAD_LIMIT:-200}" 16 python3 benchmarks/overhead.py --accelerator gpu --data "$DATA" \
    --examples "${EXAMPLES:-48000}" --repeats "${REPEATS:-3}" --variants float32,float16,float32:lzf,float32:drop \
    --hook-timing float32 --out "$OUT"
stage attend "${ATTEND_LIMIT:-200}" 8 python3 benchmarks/attend.py --device cuda --data "$DATA" \
    --store /tmp/dualform-bench/attend.h5 --layers net.0 net.4 --repeat "${ROUNDS:-3}"
stage suite "${SUITE_LIMIT:-240}" 15 python3 -m pytest -q -p no:cacheprovider -x tests
echo "done in $SECONDS s"
