"""The LLM path (`protocol: openai`): SSE framing, completion assembly and replay, cache keys, model
failover and the degraded answer. Sans-IO where it can be: bytes and dicts in, bytes and dicts out."""
