"""Upstream side of the data path: connection pools, per-target state, the terminal that calls out."""
