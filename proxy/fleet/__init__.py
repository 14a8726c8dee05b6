"""What one pod cannot do alone, on engines users already run: the fallback cache shared through Redis
(`cache`). redis-py is imported only when a config asks for it (the idle proxy does not hold it)."""
