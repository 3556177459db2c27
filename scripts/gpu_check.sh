#!/usr/bin/env bash
# Every GPU check in one go, on a machine with a CUDA GPU and PyTorch (network or not):
#
#   OUT=/some/folder scripts/gpu_check.sh
#
# 1. installs the wheels in .whl/ when there are any (packages this project needs that
#    the machine lacks, downloaded beforehand where the registry can be reached, e.g.
#    for a Python 3.12 machine with PyTorch, Triton and transformers already there:
#      for p in msgspec xgrammar apache-tvm-ffi pydantic pydantic-core annotated-types \
#               typing-inspection typing-extensions fastapi starlette uvicorn httptools \
#               bm25s opentelemetry-api; do
#        pip download --no-deps --only-binary=:all: --python-version 3.12 \
#          --implementation cp --platform manylinux_2_28_x86_64 \
#          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$p"
#      done
#    );
# 2. runs the CUDA-only tests (they skip on CPU): the compiled Triton kernels against
#    the reference, the engine against HF transformers, cache on against cache off,
#    host-tier onloads over the side stream;
# 3. runs bench/gpu_check.py (kernels at Llama-3.1-8B shapes, bandwidth, prefill
#    against SDPA, the end-to-end second turn, onloads, tile shapes).
# Each step is bounded in time (TEST_TIMEOUT, CHECK_TIMEOUT seconds; SKIP_CHECK=1 runs
# the tests alone); logs, the
# tests' JUnit XML and gpu_check.json land in $OUT. Exit status: the first that failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
    site=/tmp/prefixcache-site
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$site" .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:$site"
fi

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
    | tee "$OUT/device.txt"
"$PYTHON" -c 'import torch, triton, transformers; print("torch", torch.__version__,
"cuda", torch.version.cuda, "triton", triton.__version__, "transformers",
transformers.__version__)' | tee -a "$OUT/device.txt"

# Every test of these files runs on the GPU (the kernel tests' device fixture picks
# CUDA there) except the one that reruns the file under the CPU interpreter.
timeout "${TEST_TIMEOUT:-180}" "$PYTHON" -m pytest -q -p no:cacheprovider -rs \
    --junitxml="$OUT/cuda_tests.xml" -k "not under_the_triton_interpreter" \
    tests/test_cuda_engine.py tests/test_triton_kernels.py tests/test_backend_dispatch.py \
    2>&1 | tee "$OUT/cuda_tests.log"
tests=${PIPESTATUS[0]}

check=0
if [ "${SKIP_CHECK:-0}" != 1 ]; then
    timeout "${CHECK_TIMEOUT:-330}" "$PYTHON" bench/gpu_check.py --out "$OUT" "$@" \
        2>&1 | tee "$OUT/gpu_check.log"
    check=${PIPESTATUS[0]}
fi

echo "cuda tests: exit $tests; gpu_check: exit $check"
[ "$tests" -ne 0 ] && exit "$tests"
exit "$check"
