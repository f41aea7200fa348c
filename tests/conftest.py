"""Shared fixtures: tiny models built in code, the data dir (the shipped copies unless MTP_OCC_DATA is
set), an isolated base-model cache."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_runtest_setup(item):
    """`vllm` tests need the real engine: in CI (CI=true) a missing one fails the test, elsewhere it skips
    with the fix named."""
    if item.get_closest_marker("vllm") is None:
        return
    from mtp_occ.rollout.vllm import vllm_problem

    problem = vllm_problem(torch.cuda.is_available())
    if problem is None:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI runs the real-engine tests: {problem}", pytrace=False)
    pytest.skip(f"needs the real vLLM engine: {problem}")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    from mtp_occ.assets import data_root

    d = data_root()
    if not (d / "benchmarks").is_dir():
        pytest.fail(f"no benchmarks/ under {d}: unset MTP_OCC_DATA (the shipped data) or point it at a dir "
                    "holding benchmarks/ and train/")
    return d


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Pre-trained base models are cached per test session, never in the user's ~/.cache."""
    if "MTP_OCC_CACHE" not in os.environ:
        os.environ["MTP_OCC_CACHE"] = str(tmp_path_factory.mktemp("mtp_occ_cache"))
    yield
