"""The Preference Picker's routes on ComfyUI's own server (also usable from scripts):

- ``GET  /ppd/picker/pending`` -> the open questions (a tab opened while a prompt waits shows them);
- ``POST /ppd/picker/choose`` with ``{"request_id": ..., "choice": "A" | "B" | "skip"}`` answers one.

To cancel, use ComfyUI's own ``POST /interrupt`` (the Cancel button): the waiting node stops like any other. What a
request gets back, and how much of its body is read (at most 64 KiB), is decided in ``ppd_train.picker``
(``read_body``, ``choose_response``); this file only connects them to aiohttp.
"""

from __future__ import annotations

import sys

from ..ppd_train.picker import choose_response, read_body
from .picker_nodes import PENDING


def register() -> bool:
    """Add the routes to the running PromptServer; False when there is none (ComfyUI modules imported in a test)."""
    server_module = sys.modules.get("server")  # ComfyUI's main imports it, and starts the server, before the packs
    server = getattr(getattr(server_module, "PromptServer", None), "instance", None)
    if server is None:
        return False
    from aiohttp import web

    @server.routes.get("/ppd/picker/pending")
    async def pending(request):
        return web.json_response(PENDING.pending())

    @server.routes.post("/ppd/picker/choose")
    async def choose(request):
        status, body = choose_response(PENDING, await read_body(request.content_length, request.content.iter_any()))
        return web.json_response(body, status=status)

    return True
