#!/usr/bin/env bash
# What the CPU build of vLLM cannot settle, on one CUDA GPU (< 8 minutes): sleep/wake memory, the V2 model
# runner, ZeRO-3 bf16 on CUDA, and the speed (the benchmark's GPU section). One line per check; the script
# exits 1 if any check failed. Logs: $OUT/gpu_checks/<check>.log.  Usage:  bash tests/gpu/run_gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
LOGS="${OUT:-bench}/gpu_checks"
mkdir -p "$LOGS"
export MTP_OCC_CACHE=${MTP_OCC_CACHE:-$(mktemp -d)} WANDB_MODE=disabled PYTHONUNBUFFERED=1
failed=0

check() {  # check NAME SECONDS CMD...: run CMD under a time limit, print one PASS/FAIL line
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  if timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1; then
    echo "PASS $name ($((SECONDS - t0)) s)"
  else
    echo "FAIL $name ($((SECONDS - t0)) s, exit $?): see $LOGS/$name.log"
    tail -n 15 "$LOGS/$name.log" | sed 's/^/    /'
    failed=1
  fi
}

check cuda 60 "$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name())'
check vllm_sleep_wake_parity 200 "$PY" -m pytest -q -s tests/gpu/test_gpu.py -k sleep_level_2
check vllm_v2_runner 120 "$PY" -m pytest -q -s tests/gpu/test_gpu.py -k new_model_runner
check zero3_bf16_step 150 "$PY" -m pytest -q tests/gpu/test_gpu.py -k zero3
check speed 150 "$PY" -m mtp_occ.bench --gpu-only --out "$LOGS/gpu_results.json"
exit $failed
