"""The Preference Picker's routes on ComfyUI's own server (also usable from scripts):

- ``GET  /ppd/picker/pending`` -> the open questions (a tab opened while a prompt waits shows them);
- ``POST /ppd/picker/choose`` with ``{"request_id": ..., "choice": "A" | "B" | "skip"}`` answers one.

To cancel, use ComfyUI's own ``POST /interrupt`` (the Cancel button): the waiting node stops like any other.
"""

from __future__ import annotations

import sys

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
        try:
            body = await request.json()
            request_id, choice = str(body["request_id"]), str(body["choice"])
        except (ValueError, TypeError, KeyError):
            return web.json_response({"error": 'send JSON {"request_id": ..., "choice": "A" | "B" | "skip"}'},
                                     status=400)
        try:
            PENDING.answer(request_id, choice)
        except KeyError as e:
            return web.json_response({"error": e.args[0]}, status=404)
        except ValueError as e:
            return web.json_response({"error": str(e)}, status=400)
        return web.json_response({"ok": True})

    return True
