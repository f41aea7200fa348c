#!/usr/bin/env bash
# All GPU checks in one go (< 8 minutes on one H100/H200): vLLM/HF log-prob parity, a ZeRO-3 step, and the
# GPU section of the benchmark. Usage, on a CUDA machine in the repo root:  bash tests/gpu/run_gpu_checks.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export MTP_OCC_CACHE=${MTP_OCC_CACHE:-$(mktemp -d)} WANDB_MODE=disabled PYTHONUNBUFFERED=1
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device visible"; print(torch.cuda.get_device_name())'
timeout 420 "$PY" -m pytest -q -rs tests/gpu
timeout 150 "$PY" -m mtp_occ.bench --gpu-only --out "${OUT:-bench}/gpu_results.json"  # errors inside are recorded, not raised
