#!/usr/bin/env bash
# The one-call GPU check (issue 4), for a GPU machine whose image has PyTorch, Triton and peft.
# Usage, from the repository root:  bash examples/gpu_check.sh OUT_DIR
# Extra wheels (e.g. apache-tvm for the TVM-CUDA candidates) may be placed in .whl/; they are installed first.
set -euo pipefail
out=${1:-results/gpu}
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
timeout 470 python3 -m lsr_compile.gpu_check --out "$out"
