"""mtp_occ: joint Multi-Token Prediction + RL-from-verifiable-rewards training with Optimal
Coefficient Calibration (OCC).

`import mtp_occ` is cheap: torch, transformers, vLLM, DeepSpeed and wandb are imported by the modules
that use them. Entry points: `python -m mtp_occ.run` (train, then evaluate), `python -m mtp_occ.eval`.

CPU kernels are pinned to the AVX2 family on x86-64 (before torch is imported; `MTP_OCC_CPU_KERNELS=native`
keeps the machine's own). The same commit and seeds give bit-identical runs only with the same kernels:
torch dispatches its vectorised CPU kernels on the CPU's ISA, and AVX-512 rounds differently from AVX2, which
the embedded task's pre-training amplifies into a different base model (held-out avg@4 on one AVX-512 machine,
same commit and versions: 50.5 with its native kernels, 52.5 with torch's kernels on AVX2, 52.2 with MKL and
oneDNN on AVX2 too). Every x86-64 CPU of the last decade has AVX2, so
pinning it makes the embedded default reproduce across machines; the cost on the tiny model is within noise,
and on GPU runs the CPU kernels do not matter. A run dir records what was used (`run.json` env.torch).
"""

import os as _os
import platform as _platform

__version__ = "0.1.0"

CPU_KERNEL_ENV = {"ATEN_CPU_CAPABILITY": "avx2",  # torch's own vectorised kernels
                  "MKL_ENABLE_INSTRUCTIONS": "AVX2", "MKL_CBWR": "AVX2",  # MKL BLAS, conditional reproducibility
                  "ONEDNN_MAX_CPU_ISA": "AVX2"}  # oneDNN (mkldnn) primitives

if _os.environ.get("MTP_OCC_CPU_KERNELS", "avx2") != "native" and _platform.machine() in ("x86_64", "AMD64"):
    for _key, _value in CPU_KERNEL_ENV.items():
        _os.environ.setdefault(_key, _value)
