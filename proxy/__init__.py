"""resilience-proxy: a sidecar that keeps an app answering when its dependencies fail."""

__version__ = "0.1.0"
