"""Every shipped config composes and converts; bad values fail at compose time naming the key."""

from pathlib import Path

import pytest
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from mtp_occ.config import CONF_DIR, Config, ConfigError, compose
from mtp_occ.regimes import REGIME_CONFIGS

REPO = Path(__file__).resolve().parent.parent

GROUP_FILES = sorted(p for p in CONF_DIR.rglob("*.yaml") if p.parent != CONF_DIR and "hydra" not in p.parts)


def _override(path: Path) -> str:
    rel = path.relative_to(CONF_DIR).with_suffix("")
    return f"{rel.parent.as_posix()}={rel.name}"


# options that only make sense together with another group's option
COMPANIONS = {"data=dapo_math_17k": ["eval=math6", "model=smollm2_135m"]}


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: _override(p))
def test_every_shipped_yaml_composes_and_converts(path):
    cfg = compose([_override(path), *COMPANIONS.get(_override(path), [])])
    assert isinstance(cfg, Config)


@pytest.mark.parametrize("name", sorted(REGIME_CONFIGS))
def test_every_registered_regime_composes_without_yaml(name):
    cfg = compose([f"regime={name}"])
    assert cfg.regime.name == name
    assert type(cfg.regime) is type(REGIME_CONFIGS[name])


def _cause_text(e: BaseException) -> str:
    parts = []
    while e is not None:
        parts.append(str(e))
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


@pytest.mark.parametrize("overrides, needle", [
    (["regime=nope"], "Available options in 'regime'"),
    (["regime.lambda_plus=abc"], "lambda_plus"),
    (["regime=policy", "regime.lambda_plus=1"], "regime.lambda_plus"),
    (["algo.no_such_key=1"], "algo.no_such_key"),
    (["model.concat_order=sideways"], "hidden_first"),
    (["algo.group_size=1"], "algo.group_size"),
    (["algo.updates_per_step=3"], "algo.updates_per_step"),
    (["regime=occ", "regime.eps=0"], "regime.eps"),
    (["eval.k=0"], "eval.k"),
    (["deepspeed.stage=4"], "deepspeed.stage"),
    (["coef_schedule=step", "coef_schedule.milestones=[1.5]"], "coef_schedule.milestones"),
    (["algo.agg=mean"], "algo.agg"),
])
def test_bad_values_fail_naming_the_key(overrides, needle):
    with pytest.raises((ConfigError, HydraException, OmegaConfBaseException)) as info:
        compose(overrides)
    assert needle in _cause_text(info.value)


def test_occ_with_a_single_update_warns():
    with pytest.warns(UserWarning, match="identically 0"):
        compose(["regime=occ", "algo.updates_per_step=1"])


def test_a_dry_run_reads_the_data_the_run_will_read(tmp_path):
    """An `MTP_OCC_DATA` that points nowhere fails the dry run as it would fail the run (exit 2, the key and
    the file named), and a good one reports what it read."""
    import os
    import subprocess
    import sys

    args = [sys.executable, "-m", "mtp_occ.run", "dry_run=true", "model=smollm2_135m", "data=dapo_math_17k",
            "eval=math6", "reward=dapo"]
    bad = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=REPO,
                         env={**os.environ, "MTP_OCC_DATA": str(tmp_path / "nowhere")})
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "`data.path`" in bad.stderr and str(tmp_path / "nowhere" / "train" / "dapo-math-17k.jsonl") in bad.stderr
    env = {k: v for k, v in os.environ.items() if k != "MTP_OCC_DATA"}
    good = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=REPO, env=env, check=True).stdout
    assert "17917 prompts; eval aime24 30, aime25 30, amc23 40, math500 500, minerva 272, olympiadbench 675" in good
