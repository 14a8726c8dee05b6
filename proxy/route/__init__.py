"""Route step of the data path: which track (target) a request goes to, and the canary's own watchdog."""
