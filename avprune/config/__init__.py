"""Job configs: pydantic models validated once, at the edge."""

from avprune.config.base import ConfigError, StrictModel, load_config

__all__ = ["ConfigError", "StrictModel", "load_config"]
