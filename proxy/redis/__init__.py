"""The Redis path (`protocol: redis`): a sans-IO RESP codec, the command table, and the listener that
forwards per client connection with timeouts, read retries, a breaker and stale-read fallback."""
