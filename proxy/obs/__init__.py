"""Observability: metrics (defined once, in metrics.py) and JSON logs."""
