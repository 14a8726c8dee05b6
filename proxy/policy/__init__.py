"""The resilience chain. Outer to inner:

    fallback → load shed → total timeout → retry (budget) → breaker → classify → attempt timeout → upstream

Each policy is one small class with `async def __call__(self, req, call_next)`, built once per config load
and folded by `build_chain`; nothing here allocates per request beyond the request's own objects.
"""
