"""An upstream for the listener fuzz runs, as its own process (`python -m tests.support.fuzz_upstream PORT`):
any GET answers 200 with a small JSON body, any POST a valid chat completion, whatever was sent — so an
error the fuzz sees is the proxy's, never this upstream's."""

from __future__ import annotations

import sys

from aiohttp import web

COMPLETION = {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


async def any_request(request: web.Request) -> web.Response:
    await request.read()
    if request.method == "POST":
        return web.json_response(COMPLETION)
    return web.json_response({"ok": True})


def main() -> None:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", any_request)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
