"""Admin listener: probes for the kubelet, /metrics for Prometheus, the /admin API for operators."""
