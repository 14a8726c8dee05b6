"""Kubernetes integration: the injector (CLI and admission webhook). Not on the data path."""
