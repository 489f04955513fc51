"""Typed recipe schema, YAML loading, key=value overrides and validation."""

from longtrain.config.load import ConfigError, load_config, resolve_recipe_path, to_yaml, validate
from longtrain.config.schema import Config

__all__ = ["Config", "ConfigError", "load_config", "resolve_recipe_path", "to_yaml", "validate"]
