#!/usr/bin/env bash
# The one-command GPU check, from the repository root of a GPU machine whose Python has PyTorch and Triton:
#   bash examples/gpu_check.sh          # everything goes to $OUT (the device tool's folder), else results/gpu
# Wheels placed in .whl/ (peft at the tested version; TVM's runtime for the TVM-CUDA candidates) are installed
# first, without touching the machine's own packages. GPU_CHECK_BUDGET (seconds, default 330) sizes the run;
# the process is killed 30 s after it. Dry run of the same code on a CPU:
#   TRITON_INTERPRET=1 python -m lsr_compile.gpu_check --dry-run --out /tmp/gpu-check
set -uo pipefail
out=${OUT:-results/gpu}
budget=${GPU_CHECK_BUDGET:-330}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 3
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>&1
  python3 -m pip list 2>/dev/null | grep -iE "^(torch|triton|peft|transformers|numpy|apache-tvm)[- ]"
  timeout -k 10 $((budget + 30)) python3 -m lsr_compile.gpu_check --out "$out" --budget "$budget" "$@"
} 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
