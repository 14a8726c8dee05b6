"""Runs the proxy from its .py sources even where compiled modules sit next to them: the benchmark's
"interpreted" peer, so one run shows what compiling the hot path is worth (same code, same config, same
core). `python -m bench.purepy run --config …` takes the console script's arguments.

An extension module beside its .py wins the import (the path finder tries extension suffixes first); this
finder, placed ahead of it, loads `proxy.*` from source only.
"""

from __future__ import annotations

import importlib.machinery
import sys


class _SourceOnly:
    """A meta-path finder for the proxy package that knows only source files."""

    _loaders = [(importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES)]

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "proxy" and not name.startswith("proxy."):
            return None
        for entry in path or sys.path:
            spec = importlib.machinery.FileFinder(entry, *cls._loaders).find_spec(name)
            if spec is not None:
                return spec
        return None


def install() -> None:
    sys.meta_path.insert(0, _SourceOnly)


def compiled_modules() -> list[str]:
    """The proxy modules loaded from an extension module (empty in a pure install or under install())."""
    return sorted(n for n, m in list(sys.modules.items())
                  if (n == "proxy" or n.startswith("proxy.")) and str(getattr(m, "__file__", "")).endswith(".so"))


if __name__ == "__main__":
    install()
    import proxy.listen.http  # noqa: F401 — the hot path, imported now so the check below sees it
    from proxy.cli import main

    if compiled_modules():  # the finder did not win: this peer would measure the compiled build
        raise SystemExit(f"bench.purepy: compiled modules were loaded: {compiled_modules()}")

    sys.argv[0] = "resilience-proxy"
    raise SystemExit(main())
