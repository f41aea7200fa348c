"""The typed configuration tree: one schema, composed by Hydra, converted once.

Flow: CLI overrides -> Hydra composes `conf/config.yaml` against these dataclasses (typos, unknown keys
and wrong types fail at compose time) -> `OmegaConf.to_object` once -> plain dataclasses whose
`__post_init__` validates values and cross-field constraints with messages that name the key and the
fix. Nothing downstream sees an OmegaConf object; `build_*` functions receive flat arguments.

Every field is documented once, here, next to its definition. Choices are Enums or registry names, never
`_target_` strings. Regimes are polymorphic: each regime file registers its own `RegimeConfig`
subclass (see `mtp_occ.regimes`), so `regime=occ` needs no yaml and `regime=nope` lists the valid names.

How to look at a composed config: `python -m mtp_occ.run --cfg job [overrides...]`.
"""

from mtp_occ.config.composition import (
    CONF_DIR,
    MAX_NAME,
    NAME_EXCLUDE,
    NAME_PRIORITY,
    compose,
    plain_dict,
    register_configs,
    run_name,
    run_name_from_overrides,
    to_config,
)
from mtp_occ.config.enums import (
    AGGREGATIONS,
    DTYPES,
    ConcatOrder,
    LrSchedule,
    ModelSource,
    MtpInit,
    PolicyLevel,
    RolloutBackend,
    WandbMode,
)
from mtp_occ.config.errors import ConfigError, require
from mtp_occ.config.model import (
    CoefScheduleConfig,
    GradPathConfig,
    ModelConfig,
    PretrainConfig,
    RegimeConfig,
    ScheduleName,
)
from mtp_occ.config.root import Config
from mtp_occ.config.training import (
    AlgoConfig,
    DataConfig,
    DeepSpeedConfig,
    DiagnosticsConfig,
    EvalConfig,
    RewardConfig,
    RolloutConfig,
    WandbConfig,
)

__all__ = [
    "AGGREGATIONS", "CONF_DIR", "DTYPES", "MAX_NAME", "NAME_EXCLUDE", "NAME_PRIORITY", "AlgoConfig",
    "CoefScheduleConfig", "ConcatOrder", "Config", "ConfigError", "DataConfig", "DeepSpeedConfig",
    "DiagnosticsConfig", "EvalConfig", "GradPathConfig", "LrSchedule", "ModelConfig", "ModelSource", "MtpInit",
    "PolicyLevel", "PretrainConfig", "RegimeConfig", "RewardConfig", "RolloutBackend", "RolloutConfig",
    "ScheduleName", "WandbConfig", "WandbMode", "compose", "plain_dict", "register_configs", "require", "run_name",
    "run_name_from_overrides", "to_config",
]
