"""Configuration: the schema of every setting, and loading YAML into an immutable `Config`.

``load_config("filterd.yaml")`` reads the file and its ``local.d``/``override.d`` layers and
raises `filterd.errors.ConfigError` listing every problem. Change a loaded config with
``dataclasses.replace`` (unvalidated); see `filterd.config.schema` for adding settings.
"""

from filterd.config.load import (
    config_to_dict,
    default_config,
    describe_settings,
    dump_config,
    load_config,
    load_section_file,
)
from filterd.config.schema import (
    AntivirusConfig,
    AuthConfig,
    BayesConfig,
    Config,
    DaemonConfig,
    DnsblConfig,
    DnsblZone,
    DnsConfig,
    FrozenMap,
    GreylistConfig,
    ListsConfig,
    MilterConfig,
    MtaConfig,
    Network,
    NetworkConfig,
    ReputationConfig,
    RulesConfig,
    ScoringConfig,
    Section,
    StateConfig,
    section,
    setting,
)
from filterd.config.units import (
    Duration,
    Size,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)

__all__ = [
    "AntivirusConfig",
    "AuthConfig",
    "BayesConfig",
    "Config",
    "DaemonConfig",
    "DnsConfig",
    "DnsblConfig",
    "DnsblZone",
    "Duration",
    "FrozenMap",
    "GreylistConfig",
    "ListsConfig",
    "MilterConfig",
    "MtaConfig",
    "Network",
    "NetworkConfig",
    "ReputationConfig",
    "RulesConfig",
    "ScoringConfig",
    "Section",
    "Size",
    "StateConfig",
    "config_to_dict",
    "default_config",
    "describe_settings",
    "dump_config",
    "format_duration",
    "format_size",
    "load_config",
    "load_section_file",
    "parse_duration",
    "parse_size",
    "section",
    "setting",
]
