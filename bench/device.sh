#!/usr/bin/env bash
# The checks that need the lent GPU machine (16 cores, one NVIDIA H200, no network), run there
# from the repository root by the device tool: run(command="bash bench/device.sh", carry=[".whl"]).
# Its image has Python 3.12, torch, numpy, pyarrow, pandas, pillow, httpx, scikit-image and
# pytest but not the rest of our dependencies; `bash bench/device.sh --fetch` puts their wheels
# in .whl/ here (ignored by git: `echo /.whl/ >> .git/info/exclude`).
#
# On the device: the adapters' tests (pin_memory with a real accelerator), then the scaling
# benchmark (1 to 16 workers, the GPU feed), each under its own time limit so that a slow one
# leaves the other its results in $OUT. Not the per-role overhead benchmark: CPU time there
# is counted in 10 ms ticks, too coarse for its marginal microseconds.
set -uo pipefail

WHEELS=(simplejpeg==1.9.0 multiprocess==0.70.19 dill==0.4.1 starlette==1.10.0 uvicorn==0.54.0
        opencv-python-headless==4.12.0.88)

if [[ ${1:-} == --fetch ]]; then
    mkdir -p .whl
    for wheel in "${WHEELS[@]}"; do
        python3 -m pip download -q --no-deps --only-binary=:all: -d .whl --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 "$wheel" || exit 1
    done
    exit 0
fi

OUT=${OUT:-bench/results/device}
mkdir -p "$OUT"
if [[ -d .whl ]]; then  # else what is installed is used
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/sdk:$PWD/engine:$PWD PYTHONUNBUFFERED=1

{
    date -u
    nproc
    nvidia-smi -L
    df -h /dev/shm /tmp
    free -g
    python3 -c 'import sys, cv2, numpy, PIL, pyarrow, torch
print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      "cv2", cv2.__version__, "numpy", numpy.__version__, "pillow", PIL.__version__,
      "pyarrow", pyarrow.__version__)'
} 2>&1 | tee "$OUT/env.txt"

timeout 90 python3 -m pytest -q -p no:cacheprovider -rs tests/test_adapter_batches.py \
    2>&1 | tee "$OUT/tests.log" | tail -15
timeout 270 python3 -m bench.scaling_bench --out "$OUT/scaling.json" --rounds 2 --copies 10 \
    --tiny-copies 48 2>&1 | tee "$OUT/scaling.log"
