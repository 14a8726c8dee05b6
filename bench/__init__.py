"""The benchmark harness: resilience-proxy side by side with what a user would pick instead."""
