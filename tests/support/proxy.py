"""Running the proxy under test: in-process (`Running`, from the start_proxy fixture) or as the process
users run (`Process`), always on free loopback ports."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
from typing import Any

import aiohttp
import yaml

from tests.support.net import free_port
from tests.support.tools import ROOT
from tests.support.wait import DEADLINE, eventually

_names = itertools.count(1)


def upstream_config(url: str, **sections: Any) -> tuple[str, dict]:
    """A one-upstream config on free ports; returns (upstream name, config dict)."""
    name = f"u{next(_names)}"
    up: dict[str, Any] = {"protocol": "http", "listen": f"127.0.0.1:{free_port()}",
                          "targets": [{"name": "stable", "url": url}]}
    up.update(sections)
    return name, {"admin": {"listen": f"127.0.0.1:{free_port()}"}, "upstreams": {name: up}}


class Running:
    """A ProxyApp started in this process, and where to reach it."""

    def __init__(self, app, name: str | None) -> None:
        self.app, self.name = app, name

    @property
    def url(self) -> str:
        return f"http://{self.app.runtime.settings.upstreams[self.name].listen}"

    @property
    def port(self) -> int:
        return int(self.app.runtime.settings.upstreams[self.name].listen.rsplit(":", 1)[1])

    @property
    def admin(self) -> str:
        return f"http://{self.app.runtime.settings.admin.listen}"

    @property
    def upstream(self):
        return self.app.runtime.upstreams[self.name]

    @property
    def breaker(self):
        """The first track's breaker."""
        return self.upstream.targets[0].breaker

    def model_breaker(self, model: str = "other", track: int = 0):
        """protocol: openai — the breaker of one model on a track (`other`: every unconfigured model)."""
        return self.upstream.targets[track].models[model]

    def rewrite(self, config: dict) -> None:
        """Replace the running proxy's config file (a reload, the watcher's or an explicit one, reads it)."""
        with open(self.app.config_path, "w") as f:
            f.write(yaml.safe_dump(config))


class Process:
    """`python -m proxy <args>` as users run it. Its output goes to files, never to a pipe nobody reads
    while it runs (a chatty process would block on a full pipe)."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        import tempfile

        self._files = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
        self.proc = subprocess.Popen([sys.executable, "-m", "proxy", *args], stdout=self._files[0],
                                     stderr=self._files[1], cwd=ROOT, env={**os.environ, **(env or {})})

    @classmethod
    def run(cls, config: dict, path, *extra: str, env: dict | None = None) -> Process:
        path.write_text(yaml.safe_dump(config))
        return cls("run", "--config", str(path), *extra, env=env)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = DEADLINE) -> int:
        return await asyncio.to_thread(self.proc.wait, timeout)

    async def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                await self.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await self.wait(15)

    def output(self) -> tuple[str, str]:
        """stdout and stderr so far (all of it once the process has ended)."""
        out = []
        for f in self._files:
            f.seek(0)
            out.append(f.read().decode(errors="replace"))
        return out[0], out[1]


async def wait_http(url: str, timeout: float = DEADLINE, ok=lambda status: status < 500) -> int:
    """Until `url` answers with a status `ok` accepts; returns that status."""

    async def answered():
        try:
            async with aiohttp.ClientSession() as s, s.get(url) as r:
                return r.status if ok(r.status) else None
        except aiohttp.ClientError:
            return None

    return await eventually(answered, timeout, interval=0.05, what=f"{url} answers")
