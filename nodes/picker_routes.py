"""The Preference Picker's routes on ComfyUI's own server (also usable from scripts):

- ``GET  /ppd/picker/pending`` -> the open questions (a tab opened while a prompt waits shows them);
- ``POST /ppd/picker/choose`` with ``{"request_id": ..., "choice": "A" | "B" | "skip"}`` answers one.

To cancel, use ComfyUI's own ``POST /interrupt`` (the Cancel button): the waiting node stops like any other. What a
request gets back is decided in ``ppd_train.picker.choose_response``; this file reads at most
``MAX_BODY_BYTES + 1`` bytes of the body (ComfyUI's server itself accepts uploads of many megabytes) and hands them on.
"""

from __future__ import annotations

import sys

from ..ppd_train.picker import MAX_BODY_BYTES, choose_response
from .picker_nodes import PENDING


async def read_limited(request) -> bytes | None:
    """The request body, or None as soon as it is known to be over ``MAX_BODY_BYTES`` (the rest is never read)."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        return None
    data = bytearray()
    async for chunk in request.content.iter_any():
        data += chunk
        if len(data) > MAX_BODY_BYTES:
            return None
    return bytes(data)


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
        status, body = choose_response(PENDING, await read_limited(request))
        return web.json_response(body, status=status)

    return True
