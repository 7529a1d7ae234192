"""The dashboard's ASGI application (Starlette): pages, JSON API, live updates by SSE.

Routes::

    GET /                          fleet page
    GET /device/{id}               device page (404 page for a device the database lacks)
    GET /api/fleet                 fleet rows (JSON)
    GET /api/device/{id}           device facts, chart labels, OOD thresholds
    GET /api/device/{id}/series    telemetry columns (?after=SEQ)
    GET /api/device/{id}/events    events and acks (?after=SEQ)
    GET /live/fleet                SSE: the fleet rows, every ``fleet_period_s``
    GET /live/device/{id}          SSE: new points, events and device facts (?after=&events_after=)
    GET /static/...                page scripts and the vendored chart library (uPlot)

Read-only: the database is opened read-only and no route writes. With a ``token`` every request
needs it (``Authorization: Bearer``, the ``edgeadapt_token`` cookie, or ``?token=``, which sets
the cookie so that the page's own requests carry it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from devices.telemetry.dashboard import queries
from devices.telemetry.database import Database, connect

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "edgeadapt_token"
KEEPALIVE_S = 10.0


class Reader:
    """A read-only connection shared by one request or one live stream (calls serialized)."""

    def __init__(self, target: str | Path):
        self._db: Database = connect(target, readonly=True)
        self._lock = threading.Lock()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(db, *args)`` in a worker thread."""

        def call() -> Any:
            with self._lock:
                return fn(self._db, *args)

        return await run_in_threadpool(call)

    def close(self) -> None:
        """Close the connection."""
        self._db.close()


def create_app(
    db: str | Path, *, token: str | None = None, poll_s: float = 0.2, fleet_period_s: float = 1.0
) -> Starlette:
    """The dashboard app over the collector database ``db`` (SQLite path or PostgreSQL URL).

    ``poll_s`` is how often a live device stream looks for new records (s).
    """
    reader = Reader(db)  # fails early, with a clear message, on a missing database

    async def fleet_page(request: Request) -> Response:
        return FileResponse(STATIC / "fleet.html")

    async def device_page(request: Request) -> Response:
        device = request.path_params["device"]
        if await reader.run(queries.device_meta, device) is None:
            return _not_found(device)
        return FileResponse(STATIC / "device.html")

    async def api_fleet(request: Request) -> Response:
        return JSONResponse({"devices": await reader.run(queries.fleet), "now": time.time()})

    async def api_device(request: Request) -> Response:
        device = request.path_params["device"]
        meta = await reader.run(queries.device_meta, device)
        if meta is None:
            return JSONResponse({"error": f"unknown device {device!r}"}, status_code=404)
        return JSONResponse(meta)

    async def api_series(request: Request) -> Response:
        after = _int_param(request, "after")
        data = await reader.run(queries.series, request.path_params["device"], after)
        return JSONResponse(data)

    async def api_events(request: Request) -> Response:
        after = _int_param(request, "after")
        return JSONResponse(await reader.run(queries.events, request.path_params["device"], after))

    async def live_fleet(request: Request) -> Response:
        return _sse(request, db, lambda r: _fleet_stream(r, fleet_period_s))

    async def live_device(request: Request) -> Response:
        device = request.path_params["device"]
        after, ev_after = _int_param(request, "after"), _int_param(request, "events_after")
        return _sse(request, db, lambda r: _device_stream(r, device, after, ev_after, poll_s))

    routes = [
        Route("/", fleet_page),
        Route("/device/{device}", device_page),
        Route("/api/fleet", api_fleet),
        Route("/api/device/{device}", api_device),
        Route("/api/device/{device}/series", api_series),
        Route("/api/device/{device}/events", api_events),
        Route("/live/fleet", live_fleet),
        Route("/live/device/{device}", live_device),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        reader.close()

    app = Starlette(routes=routes, lifespan=lifespan)
    if token:
        app.add_middleware(_TokenMiddleware, token=token)  # type: ignore[arg-type]
    return app


# --- live streams ----------------------------------------------------------------------------
def _sse(
    request: Request, db: str | Path, body: Callable[[Reader], AsyncIterator[str]]
) -> StreamingResponse:
    async def stream() -> AsyncIterator[str]:
        reader = Reader(db)
        try:
            async for chunk in body(reader):
                if await request.is_disconnected():
                    break
                yield chunk
        finally:
            reader.close()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


async def _fleet_stream(reader: Reader, period_s: float) -> AsyncIterator[str]:
    last = ""
    quiet_since = time.monotonic()
    while True:
        text = json.dumps({"devices": await reader.run(queries.fleet)})
        if text != last:
            last, quiet_since = text, time.monotonic()
            yield _event("fleet", text)
        elif time.monotonic() - quiet_since > KEEPALIVE_S:
            quiet_since = time.monotonic()
            yield ": keepalive\n\n"
        await asyncio.sleep(period_s)


async def _device_stream(
    reader: Reader, device: str, after: int, ev_after: int, poll_s: float
) -> AsyncIterator[str]:
    last_meta, quiet_since, meta_due = "", time.monotonic(), 0.0
    while True:
        sent = False
        data = await reader.run(queries.series, device, after, 2000)
        if data["seq"]:
            after = data["last_seq"]
            sent = True
            yield _event("points", json.dumps(data))
        evs = await reader.run(queries.events, device, ev_after)
        if evs["items"]:
            ev_after = evs["last_seq"]
            sent = True
            yield _event("events", json.dumps(evs))
        if time.monotonic() >= meta_due:  # online state, last seen: once a second is plenty
            meta_due = time.monotonic() + 1.0
            meta = json.dumps(await reader.run(queries.device_meta, device))
            if meta != last_meta:
                last_meta, sent = meta, True
                yield _event("meta", meta)
        if sent:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > KEEPALIVE_S:
            quiet_since = time.monotonic()
            yield ": keepalive\n\n"
        await asyncio.sleep(poll_s)


def _event(name: str, data: str) -> str:
    return f"event: {name}\ndata: {data}\n\n"


# --- helpers -----------------------------------------------------------------------------------
def _int_param(request: Request, name: str) -> int:
    try:
        return max(int(request.query_params.get(name, "0")), 0)
    except ValueError:
        return 0


def _not_found(device: str) -> HTMLResponse:
    import html

    name = html.escape(device)
    body = (
        "<!doctype html><html><head><meta charset='utf-8'><title>unknown device</title>"
        "<link rel='stylesheet' href='/static/dashboard.css'></head><body>"
        f"<h1 id='not-found'>404: unknown device <code>{name}</code></h1>"
        "<p>The collector database has no record, birth or state of this device.</p>"
        "<p><a href='/'>back to the fleet</a></p></body></html>"
    )
    return HTMLResponse(body, status_code=404)


class _TokenMiddleware:
    """Refuse every request that does not carry the dashboard token (pure ASGI: SSE-safe)."""

    def __init__(self, app: Any, token: str):
        self.app = app
        self.token = token.encode()

    async def __call__(
        self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Any
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        query = request.query_params.get("token")
        offered = (
            _bearer(request.headers.get("authorization", ""))
            or request.cookies.get(COOKIE)
            or query
            or ""
        )
        if not hmac.compare_digest(offered.encode(), self.token):
            response = PlainTextResponse("401: this dashboard needs its token\n", status_code=401)
            await response(scope, receive, send)
            return
        if query is None:
            await self.app(scope, receive, send)
            return

        async def send_with_cookie(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                cookie = f"{COOKIE}={query}; Path=/; HttpOnly; SameSite=Strict"
                message["headers"] = [*message.get("headers", []), (b"set-cookie", cookie.encode())]
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def _bearer(header: str) -> str | None:
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None
