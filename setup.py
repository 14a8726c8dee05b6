"""Build: metadata lives in pyproject.toml; this file only adds the hot path's extension modules, and only
when asked: `RESILIENCE_PROXY_COMPILE=1 pip install --no-build-isolation -e .` (Cython installed first)
compiles the modules of HOT with Cython in pure-Python mode (the same .py files, no .pyx).

Not the default, because it is slower today (bench/results/compile-choice.md): with all these modules
compiled this way the proxy forwards 0.74-0.84x what the same code does interpreted (two runs, one core; the
server and client alone compiled: 0.94x, within the noise). The profile points at attribute access:
Python 3.11's specialising interpreter caches attribute and slot look-ups in the bytecode, while Cython's
code for a plain class (every class here) takes the generic look-up each time.
Compiling pays only once the hot classes are extension types with typed fields and the code that reads
them knows their types (Cython .pxd declarations, or mypyc over type-clean modules, which enforces every
annotation at run time: one loose hint, `counters = None` later set to an object, stopped the proxy from
starting in the mypyc trial). That is the next step of issue 17; this file is where it plugs in.

A compiled module next to its .py shadows it: a pure install must be made from a tree without them
(`find proxy -name '*.so' -delete`), and bench/purepy.py runs the sources of a compiled tree.
"""

import os

from setuptools import setup

# The request path end to end (listener, chain, pool, codecs); what runs once per load or per probe is
# not here: compiling it would cost build time and save nothing.
HOT = [
    "proxy/exchange.py",
    "proxy/http1/server.py",
    "proxy/http1/client.py",
    "proxy/listen/http.py",
    "proxy/listen/inbound.py",
    "proxy/listen/openai.py",
    "proxy/policy/base.py",
    "proxy/policy/breaker.py",
    "proxy/policy/classify.py",
    "proxy/policy/fallback.py",
    "proxy/policy/retry.py",
    "proxy/policy/shed.py",
    "proxy/policy/timeout.py",
    "proxy/route/tracks.py",
    "proxy/upstream/http.py",
    "proxy/upstream/pool.py",
    "proxy/redis/codec.py",
    "proxy/redis/flow.py",
    "proxy/redis/listener.py",
    "proxy/redis/upstream.py",
    "proxy/redis/replies.py",
    "proxy/redis/resilience.py",
    "proxy/redis/cache.py",
    "proxy/llm/sse.py",
    "proxy/llm/splice.py",
    "proxy/obs/log.py",
]


def ext_modules():
    if os.environ.get("RESILIENCE_PROXY_COMPILE") != "1":
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        raise SystemExit("RESILIENCE_PROXY_COMPILE=1 needs Cython in the build environment: "
                         "pip install 'Cython>=3.0,<4' and install with --no-build-isolation") from None

    exts = cythonize(
        HOT,
        language_level=3,
        nthreads=os.cpu_count() or 1,
        # Annotations stay hints: Cython would otherwise type `float` as a C double and `bytes` as exact,
        # and a None or a bytearray where the hint is loose would raise where Python accepts it.
        compiler_directives={"annotation_typing": False, "binding": True},
        quiet=True,
    )
    for e in exts:
        # -O2 without debug info: the build in a third of the time of Python's own -O3 -g (5 min 19 s
        # serial on this machine; 1 min 37-46 s this way, on both of its cores)
        e.extra_compile_args += ["-O2", "-g0"]
    return exts


setup(ext_modules=ext_modules(), options={"build_ext": {"parallel": os.cpu_count() or 1}})
