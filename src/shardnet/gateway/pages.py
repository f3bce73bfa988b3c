"""The gateway's web pages: a chat page at ``/`` and a swarm monitor at ``/swarm``, plain HTML/CSS/JS from
``static/`` (no CDN), and ``/api/swarm``: ``shardnet status --json``'s document plus the route in use and
the gateway's recent activity.

The swarm page draws from that document alone: a block map (``blockmap.js``, SVG: a bar per server over its
span, coloured by state, shaded by the share of its cache in use, red where no online server holds a block),
charts of the last minutes (``charts.js``, a hand-written canvas line chart: decode tokens/s and time to
first token per answer, each hop's mean time over an answer's decode steps), the latest steps hop by hop,
the servers, and the per-block table behind a details toggle."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from shardnet.client.swarm_status import status_document
from shardnet.errors import ShardnetError
from shardnet.gateway.activity import route_hops

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"


def swarm_document(gateway) -> dict:
    """``status --json`` for the gateway's model, plus the route a new request would take now and
    ``recent`` (``RecentActivity.document()``): the latest route, steps hop by hop, and the charts' series."""
    model = gateway.model
    document = status_document(
        model.swarm.servers(), model.model_id, model.num_blocks, str(model.config.model_type)
    )
    document["model_name"] = gateway.model_name
    try:
        document["route"] = route_hops(model.route())
        document["route_error"] = None
    except ShardnetError as exc:
        document["route"] = []
        document["route_error"] = str(exc)
    document["recent"] = gateway.activity.document()
    return document


def add_pages(app: FastAPI, gateway) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(STATIC / "chat.html")

    @app.get("/swarm", include_in_schema=False)
    async def swarm_page() -> FileResponse:
        return FileResponse(STATIC / "swarm.html")

    @app.get("/api/swarm")
    async def swarm_status() -> dict:
        return await asyncio.to_thread(swarm_document, gateway)  # route() may wait on the swarm view
