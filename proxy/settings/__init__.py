"""Config specs and loading. Nothing here runs per request."""

from proxy.settings.loader import DEFAULT_PATH, ConfigError, Loaded, Settings, load, redacted

__all__ = ["DEFAULT_PATH", "ConfigError", "Loaded", "Settings", "load", "redacted"]
