"""Shared fixtures: tiny models built in code, the shared data dir, an isolated base-model cache."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("MTP_OCC_DATA", str(REPO.parent / "shared" / "data"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = Path(os.environ["MTP_OCC_DATA"])
    if not (d / "benchmarks").is_dir():
        pytest.fail(f"shared data not found at {d}: set MTP_OCC_DATA to the dir holding benchmarks/ and train/")
    return d


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Pre-trained base models are cached per test session, never in the user's ~/.cache."""
    if "MTP_OCC_CACHE" not in os.environ:
        os.environ["MTP_OCC_CACHE"] = str(tmp_path_factory.mktemp("mtp_occ_cache"))
    yield
