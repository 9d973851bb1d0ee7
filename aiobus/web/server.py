"""The HTTP listener (aiohttp), run by ``Broker.serve`` in the broker's own event loop.

Why aiohttp: it runs inside an event loop that already exists (``AppRunner`` and
``TCPSite``: no server process or thread of its own, as uvicorn would want), serves
server-sent events with a plain streamed response, and is one dependency.

It never blocks the bus: every handler reads the broker core synchronously (a STATS
build or a PEEK is the same work a client's frame causes) and writes with awaits, as
any connection does. Admin actions call the core and then ``Broker._after_events`` so
their deliveries and journal records go out in the same loop turn, as for a frame.

Routes (all JSON but ``/`` and ``/metrics``):

* ``GET /metrics``: Prometheus text (:func:`aiobus.metrics.render`).
* ``GET /``: the dashboard page. ``GET /api/events``: server-sent events, one
  ``stats`` event a second: the statistics and the rates since the last one.
* ``GET /api/queues/{queue}/messages?offset=&limit=``: PEEK, each message with its
  headers and a preview of its body; ``.../messages/{id}``: one, its body decoded
  (msgpack) or in hex, cut at ``SHOW_BODY`` bytes.
* ``POST /api/queues/{queue}/requeue`` (``{"ids": [...]}``, or ``{}`` for all) and
  ``POST /api/queues/{queue}/purge``: admin.

Access. A cross-site request is refused (403): one whose ``Origin`` is not this
listener's own, or whose ``Sec-Fetch-Site`` says ``cross-site``; on loopback the
``Host`` must be a loopback name too (DNS rebinding). Admin requests need the token,
random per start, that the broker writes to a 0600 file beside its socket, in the
``X-Aiobus-Token`` header and a JSON body (which a plain HTML form cannot send). So do
message contents (PEEK): the socket's mode keeps other local users from reading
messages, and a loopback TCP port must not undo that. Counts (the page, its events,
``/metrics``) need no token on loopback; on any other address they need it too
(``X-Aiobus-Token`` or ``Authorization: Bearer``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.resources
import json
import logging
import os
import secrets
import time
from typing import TYPE_CHECKING, Any

import anyio
from aiohttp import web
from anyio.abc import TaskStatus

from ..cli.bodies import to_jsonable
from ..errors import BusError, NoSuchQueue
from ..metrics import CONTENT_TYPE, render
from ..protocol import BodyKind, decode_body
from ..stats import Sample, compute_rates
from . import TOKEN_HEADER, is_loopback, parse_address

if TYPE_CHECKING:
    from ..broker.server import Broker

__all__ = ["serve_http"]

log = logging.getLogger(__name__)

EVENT_INTERVAL = 1.0  # seconds between two ``stats`` events of a stream
SHOW_BODY = 64 * 1024  # bytes of a body shown at most
PREVIEW = 80  # characters of a body in a list
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


class _Access:
    """The checks of every request (see the module docstring)."""

    def __init__(self, token: str, loopback: bool) -> None:
        self.token = token
        self.loopback = loopback

    def _has_token(self, request: web.Request) -> bool:
        given = request.headers.get(TOKEN_HEADER, "")
        auth = request.headers.get("Authorization", "")
        if not given and auth.startswith("Bearer "):
            given = auth[7:]
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())

    def check(self, request: web.Request, *, admin: bool, contents: bool = False) -> None:
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"http://{request.host}":
            raise web.HTTPForbidden(text="cross-site request refused (Origin)\n")
        if request.headers.get("Sec-Fetch-Site") == "cross-site":
            raise web.HTTPForbidden(text="cross-site request refused (Sec-Fetch-Site)\n")
        if self.loopback and request.host.rpartition(":")[0] not in _LOOPBACK_NAMES:
            raise web.HTTPForbidden(text="this listener answers only to a loopback Host\n")
        if (admin or contents or not self.loopback) and not self._has_token(request):
            raise web.HTTPUnauthorized(text=f"this needs the admin token in the"
                                            f" {TOKEN_HEADER} header\n")


def _body_text(raw: bytes, kind: int, truncated: bool) -> tuple[str, str]:
    """(how it is shown, the text): msgpack decoded to JSON, UTF-8 text, else hex."""
    if kind == BodyKind.PACKED and not truncated:
        try:
            value = decode_body(raw, kind)
        except Exception:  # a producer's bad encoding is shown, not raised
            return "hex", raw.hex(" ")
        if isinstance(value, bytes):
            return "hex", value.hex(" ")
        return "msgpack", json.dumps(to_jsonable(value), ensure_ascii=False)
    if kind == BodyKind.RAW:
        try:
            return "text", raw.decode()
        except UnicodeDecodeError:
            pass
    return "hex", raw.hex(" ")


def _message(message: list[Any], size: int, max_text: int | None) -> dict[str, Any]:
    mid, queue, body, kind, headers, timestamp = message
    how, text = _body_text(body, kind, len(body) < size)
    if max_text is not None and len(text) > max_text:
        text = text[:max_text] + "…"
    return {"id": mid, "queue": queue, "headers": headers or {}, "timestamp": timestamp,
            "size": size, "kind": kind, "shown_as": how, "body": text,
            "truncated": len(body) < size}


def _json(value: Any, status: int = 200) -> web.Response:
    return web.json_response(to_jsonable(value), status=status,
                             dumps=lambda v: json.dumps(v, ensure_ascii=False))


def _int(request: web.Request, name: str, default: int) -> int:
    try:
        return int(request.query.get(name, default))
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be an integer\n") from None


class _Handlers:
    def __init__(self, broker: Broker, access: _Access, stopping: asyncio.Event) -> None:
        self.broker = broker
        self.access = access
        self.stopping = stopping

    async def page(self, request: web.Request) -> web.Response:
        self.access.check(request, admin=False)
        html = importlib.resources.files(__package__).joinpath("dashboard.html").read_text()
        html = html.replace("{{TOKEN_PATH}}", self.broker.token_path or "?")
        return web.Response(text=html, content_type="text/html", headers={
            "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline';"
                                       " script-src 'self' 'unsafe-inline'",
            "X-Frame-Options": "DENY"})

    async def metrics(self, request: web.Request) -> web.Response:
        self.access.check(request, admin=False)
        return web.Response(body=render(self.broker.stats()).encode(),
                            headers={"Content-Type": CONTENT_TYPE})

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: ``stats`` with the statistics and ``rates``, each second."""
        self.access.check(request, admin=False)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-store"})
        await response.prepare(request)
        previous: Sample | None = None
        while not self.stopping.is_set():
            current = Sample(time.monotonic(), self.broker.stats())
            rates = compute_rates(previous, current)
            data = json.dumps(to_jsonable({"stats": current.stats,
                                           "rates": rates.as_dict() if rates else None}))
            try:
                await response.write(f"event: stats\ndata: {data}\n\n".encode())
            except (ConnectionError, RuntimeError):
                break  # the page went away
            previous = current
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), EVENT_INTERVAL)
        return response

    def _queue(self, request: web.Request) -> str:
        return request.match_info["queue"]

    async def browse(self, request: web.Request) -> web.Response:
        self.access.check(request, admin=False, contents=True)
        options = {"offset": _int(request, "offset", 0),
                   "limit": _int(request, "limit", 100), "max_body": 1024}
        try:
            page = self.broker.core.peek(self._queue(request), options)
        except NoSuchQueue as exc:
            return _json({"error": str(exc)}, 404)
        except BusError as exc:
            return _json({"error": str(exc)}, 400)
        return _json({"ready": page["ready"], "offset": page["offset"],
                      "messages": [_message(m, size, PREVIEW) for m, size in page["messages"]]})

    async def show(self, request: web.Request) -> web.Response:
        self.access.check(request, admin=False, contents=True)
        try:
            page = self.broker.core.peek(self._queue(request),
                                         {"id": request.match_info["id"],
                                          "max_body": SHOW_BODY})
        except NoSuchQueue as exc:
            return _json({"error": str(exc)}, 404)
        if not page["messages"]:
            return _json({"error": "no such ready message"}, 404)
        message, size = page["messages"][0]
        return _json(_message(message, size, None))

    async def _admin_body(self, request: web.Request) -> dict[str, Any]:
        self.access.check(request, admin=True)
        if request.content_type != "application/json":
            raise web.HTTPUnsupportedMediaType(text="send application/json\n")
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="the body is not JSON\n") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="the body must be a JSON object\n")
        return body

    async def requeue(self, request: web.Request) -> web.Response:
        body = await self._admin_body(request)
        ids = body.get("ids")
        if ids is not None and not (isinstance(ids, list)
                                    and all(isinstance(i, str) for i in ids)):
            raise web.HTTPBadRequest(text="ids must be a list of message ids\n")
        broker = self.broker
        try:
            count = broker.core.requeue_dead_letters(self._queue(request), ids,
                                                     broker.loop.time())
        except NoSuchQueue as exc:
            return _json({"error": str(exc)}, 404)
        broker._after_events()
        log.info("dashboard: requeued %d dead letters of %s", count, self._queue(request))
        return _json({"requeued": count})

    async def purge(self, request: web.Request) -> web.Response:
        await self._admin_body(request)
        broker = self.broker
        try:
            count = broker.core.purge(self._queue(request), broker.loop.time())
        except NoSuchQueue as exc:
            return _json({"error": str(exc)}, 404)
        broker._after_events()
        log.info("dashboard: purged %d messages of %s", count, self._queue(request))
        return _json({"purged": count})


def _write_token(path: str, token: str) -> None:
    """``token`` into ``path``, mode 0600 from birth, never through a planted symlink."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")


def token_path_for(broker: Broker) -> str:
    """Beside the socket (``<socket>.token``), else in the data directory."""
    if broker.path is not None:
        return broker.path + ".token"
    if broker.data_dir is not None:
        return os.path.join(broker.data_dir, "http.token")
    raise BusError("--http needs a socket path or a data directory for its token file")


def make_app(broker: Broker, token: str, loopback: bool) -> tuple[web.Application,
                                                                   asyncio.Event]:
    stopping = asyncio.Event()
    h = _Handlers(broker, _Access(token, loopback), stopping)
    app = web.Application()
    app.router.add_get("/", h.page)
    app.router.add_get("/metrics", h.metrics)
    app.router.add_get("/api/events", h.events)
    app.router.add_get("/api/queues/{queue}/messages", h.browse)
    app.router.add_get("/api/queues/{queue}/messages/{id}", h.show)
    app.router.add_post("/api/queues/{queue}/requeue", h.requeue)
    app.router.add_post("/api/queues/{queue}/purge", h.purge)

    async def on_shutdown(_: web.Application) -> None:
        stopping.set()  # event streams end instead of holding the shutdown

    app.on_shutdown.append(on_shutdown)
    return app, stopping


async def serve_http(broker: Broker, *,
                     task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve ``broker.http`` until cancelled (``Broker.serve`` owns this task)."""
    assert broker.http is not None
    host, port = parse_address(broker.http)
    token = secrets.token_urlsafe(32)
    token_path = token_path_for(broker)
    _write_token(token_path, token)
    broker.token_path = token_path
    app, _ = make_app(broker, token, is_loopback(host))
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        shown_host = f"[{host}]" if ":" in host else host
        broker.http_url = f"http://{shown_host}:{bound}/"
        log.info("dashboard at %s, Prometheus metrics at %smetrics; admin token in %s",
                 broker.http_url, broker.http_url, token_path)
        task_status.started()
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await runner.cleanup()
            with contextlib.suppress(OSError):
                os.unlink(token_path)
