"""The typed config tree (schema), its loading with did-you-mean errors, and the explanations of every key."""

from tunesmith.config.schema import (CheckpointConfig, Config, DataConfig, EvalConfig, MethodConfig, ModelConfig,
                                     OutputConfig, TrainConfig, config_from_dict, load_config, parse_overrides,
                                     resolve_paths)

__all__ = ["CheckpointConfig", "Config", "DataConfig", "EvalConfig", "MethodConfig", "ModelConfig", "OutputConfig",
           "TrainConfig", "config_from_dict", "load_config", "parse_overrides", "resolve_paths"]
