"""The gateway's web pages: a chat page at ``/`` and a swarm monitor at ``/swarm``, plain HTML/CSS/JS from
``static/`` (no CDN), and ``/api/swarm``: ``shardnet status --json``'s document plus the route in use."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from shardnet.client.swarm_status import status_document
from shardnet.errors import ShardnetError

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"


def swarm_document(gateway) -> dict:
    """``status --json`` for the gateway's model, plus the route a new request would take now and the
    route and per-hop step timings of the latest generations."""
    model = gateway.model
    document = status_document(
        model.swarm.servers(), model.model_id, model.num_blocks, str(model.config.model_type)
    )
    document["model_name"] = gateway.model_name
    try:
        document["route"] = [
            {
                "span": f"{hop.start}:{hop.end}",
                "peer_id": hop.peer_id,
                "short_id": hop.server.short_id,
                "address": hop.server.address,
            }
            for hop in model.route()
        ]
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
