"""Deployment settings from environment variables, and feature flags."""

from corral._exceptions import ConfigError
from corral.config._flags import FLAGS, Flags
from corral.config._imports import DEFAULT_ALLOWED_IMPORTS, SAFE_MODULES
from corral.config._settings import (
    CgroupMode,
    ExecutorKind,
    Settings,
    get_settings,
    load_settings,
    parse_executor,
    reload_settings,
)

__all__ = [
    "DEFAULT_ALLOWED_IMPORTS",
    "FLAGS",
    "SAFE_MODULES",
    "CgroupMode",
    "ConfigError",
    "ExecutorKind",
    "Flags",
    "Settings",
    "get_settings",
    "load_settings",
    "parse_executor",
    "reload_settings",
]
