#!/usr/bin/env bash
# Create .venv and install prefixcache with its extras. Idempotent: a second run
# only checks that nothing changed. On machines without CUDA the CPU build of torch
# is installed first, so the CUDA build (several GB) is never pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_CPU_VERSION=${TORCH_CPU_VERSION:-2.13.0}
VENV=.venv
STAMP="$VENV/.prefixcache-installed"

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "setup: CUDA found, installing torch"
        "${PIP[@]}" install torch
    else
        echo "setup: no CUDA, installing the CPU build torch==$TORCH_CPU_VERSION"
        "${PIP[@]}" install "torch==$TORCH_CPU_VERSION"
    fi
fi

# The gpu extra is triton: on CPU its interpreter runs the kernel tests. It does not
# depend on torch, so the CPU torch stays. Triton ships Linux wheels only. The cluster
# extra (Ray Serve, the Redis client) runs the replica and shared KV tier tests.
EXTRAS=dev,cluster
if [ "$(uname -s)" = Linux ]; then
    EXTRAS=dev,cluster,gpu
fi
echo "setup: installing prefixcache[$EXTRAS]"
"${PIP[@]}" install -e ".[$EXTRAS]"
echo "$want" > "$STAMP"
