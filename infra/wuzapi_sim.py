"""A WUZAPI simulator: WUZAPI's HTTP contract for what Cortexx uses, with fault injection
switched at run time and a ledger of what it delivered, by message id (a resend of a known id
is counted but, as on WhatsApp, is the same message).

The only outside party Cortexx simulates. Faults (`PUT /_sim/faults`): an error rate answering
a chosen status, added latency, hanging calls, connections reset (`down`), a listener closed for
a while (`down_for_s`), a lost WhatsApp session, and per-phone forced statuses. A send is written
to the ledger only if the caller is still connected when it is accepted, as a gateway that
honours its request context would.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from infra.logging import get_logger
from schemas.wuzapi import (
    MARK_READ,
    SEND_DOCUMENT,
    SEND_IMAGE,
    SEND_TEXT,
    SESSION_STATUS,
    TOKEN_HEADER,
    error_envelope,
    ok_envelope,
)

log = get_logger("wuzapi_sim")


@dataclass
class Faults:
    error_rate: float = 0.0
    error_status: int = 500
    latency_ms: float = 0.0
    hang: bool = False
    down: bool = False
    session_lost: bool = False
    retry_after_s: float | None = None
    # phone -> status to answer for sends to it (e.g. 400 for a number WUZAPI refuses).
    fail_phones: dict[str, int] = field(default_factory=dict)


@dataclass
class Delivery:
    id: str
    path: str
    phone: str
    body: str | None
    accepted: int  # deliveries to the recipient: 1, whatever the resends of the same id
    requests: int  # sends of this id the gateway accepted (a resend after a lost answer)
    first_at: float


class WuzapiSimulator:
    def __init__(self, *, tokens: set[str] | None = None, seed: int | None = None) -> None:
        self.faults = Faults()
        # Empty: any non-empty token is a user; otherwise only these are.
        self.tokens: set[str] = set(tokens or ())
        self.deliveries: dict[str, Delivery] = {}
        self.requests = 0
        self.errors = 0
        self.random = random.Random(seed)
        self.site: web.TCPSite | None = None
        self.runner: web.AppRunner | None = None
        self._down_task: asyncio.Task[None] | None = None
        self._port = 0

    # The WUZAPI contract ---------------------------------------------------------------------

    def _reply(self, code: int, body: dict[str, Any]) -> web.Response:
        return web.Response(body=orjson.dumps(body), status=code, content_type="application/json")

    def _error(self, code: int, message: str, *, retry_after: float | None = None) -> web.Response:
        self.errors += 1
        response = self._reply(code, error_envelope(code, message))
        if retry_after is not None:
            response.headers["Retry-After"] = str(int(retry_after) if retry_after >= 1 else retry_after)
        return response

    async def _faults_before(self, request: web.Request) -> web.StreamResponse | None:
        self.requests += 1
        faults = self.faults
        if faults.down:
            # Reset the connection: to the client it is a gateway that is not there.
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError
        if faults.hang:
            await asyncio.Event().wait()
        if faults.latency_ms:
            await asyncio.sleep(faults.latency_ms / 1000)
        token = request.headers.get(TOKEN_HEADER) or request.query.get("token", "")
        if not token or (self.tokens and token not in self.tokens):
            return self._error(401, "unauthorized")
        if faults.session_lost:
            return self._error(500, "No session")
        if faults.error_rate and self.random.random() < faults.error_rate:
            status = faults.error_status
            message = "Error sending message: simulated failure" if status >= 500 else "simulated"
            return self._error(status, message, retry_after=faults.retry_after_s if status == 429 else None)
        return None

    async def _payload(self, request: web.Request) -> dict[str, Any] | web.Response:
        try:
            payload = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return self._error(400, "Could not decode Payload")
        if not isinstance(payload, dict):
            return self._error(400, "Could not decode Payload")
        return payload

    async def send(self, request: web.Request) -> web.StreamResponse:
        refused = await self._faults_before(request)
        if refused is not None:
            return refused
        payload = await self._payload(request)
        if isinstance(payload, web.Response):
            return payload
        phone = str(payload.get("Phone") or "")
        if not phone:
            return self._error(400, "Missing Phone in Payload")
        path = request.path
        required = {SEND_TEXT: "Body", SEND_IMAGE: "Image", SEND_DOCUMENT: "Document"}[path]
        if not payload.get(required):
            return self._error(400, f"Missing {required} in Payload")
        if path == SEND_DOCUMENT and not payload.get("FileName"):
            return self._error(400, "Missing FileName in Payload")
        forced = self.faults.fail_phones.get(phone)
        if forced is not None:
            message = {401: "unauthorized"}.get(forced, "Error: invalid phone number")
            return self._error(forced, message if forced < 500 else "No session")
        message_id = str(payload.get("Id") or f"{self.random.getrandbits(128):032X}")
        transport = request.transport
        if transport is None or transport.is_closing():
            return self._error(499, "client went away")  # never accepted: not in the ledger
        self._accept(message_id, path, phone, payload.get("Body") or payload.get("Caption"))
        now = datetime.now(UTC).isoformat(timespec="seconds")
        return self._reply(200, ok_envelope({"Details": "Sent", "Id": message_id, "Timestamp": now}))

    def _accept(self, message_id: str, path: str, phone: str, body: Any) -> None:
        delivery = self.deliveries.get(message_id)
        if delivery is None:
            self.deliveries[message_id] = Delivery(
                message_id, path, phone, None if body is None else str(body), 1, 1, time.time()
            )
            return
        # WhatsApp keys a message by its id: the same id sent again is the same message, so the
        # recipient still has one. A different id for the same reply would be a second delivery.
        delivery.requests += 1
        log.info("wuzapi_sim.resend", id=message_id, requests=delivery.requests)

    async def markread(self, request: web.Request) -> web.StreamResponse:
        refused = await self._faults_before(request)
        if refused is not None:
            return refused
        payload = await self._payload(request)
        if isinstance(payload, web.Response):
            return payload
        ids = payload.get("Id")
        if not isinstance(ids, list) or not ids:
            return self._error(400, "Missing Id in Payload")
        if not (payload.get("ChatPhone") or payload.get("Chat")):
            return self._error(400, "Missing Chat in Payload")
        return self._reply(200, ok_envelope({"Details": "Message(s) marked as read"}))

    async def status(self, request: web.Request) -> web.StreamResponse:
        refused = await self._faults_before(request)
        if refused is not None:
            return refused
        return self._reply(200, ok_envelope({"Connected": True, "LoggedIn": True}))

    # Control ---------------------------------------------------------------------------------

    async def get_faults(self, _: web.Request) -> web.Response:
        return self._reply(200, asdict(self.faults))

    async def put_faults(self, request: web.Request) -> web.Response:
        try:
            changes = orjson.loads(await request.read())
            down_for = changes.pop("down_for_s", None)
            self.faults = Faults(**{**asdict(self.faults), **changes})
        except (orjson.JSONDecodeError, TypeError, AttributeError) as exc:
            return self._reply(400, {"error": "bad_faults", "detail": str(exc)})
        log.info("wuzapi_sim.faults", **asdict(self.faults), down_for_s=down_for)
        if down_for:
            self._down_task = asyncio.create_task(self._close_for(float(down_for)))
        return self._reply(200, asdict(self.faults))

    async def _close_for(self, seconds: float) -> None:
        """Stop listening for `seconds`: connections are refused, as with a gateway that is down."""
        assert self.site is not None and self.runner is not None
        port = self.port
        # New connections are refused; kept-alive ones are reset on their next request.
        self.faults.down = True
        await self.site.stop()
        await asyncio.sleep(seconds)
        self.faults.down = False
        self.site = web.TCPSite(self.runner, "127.0.0.1", port, reuse_address=True)
        await self.site.start()
        log.info("wuzapi_sim.back_up", port=port)

    async def reset(self, _: web.Request) -> web.Response:
        self.faults = Faults()
        self.deliveries.clear()
        self.requests = self.errors = 0
        return self._reply(200, {"status": "reset"})

    async def ledger(self, _: web.Request) -> web.Response:
        return self._reply(
            200,
            {
                "requests": self.requests,
                "errors": self.errors,
                "deliveries": {k: asdict(v) for k, v in self.deliveries.items()},
                "duplicates": [k for k, v in self.deliveries.items() if v.accepted > 1],
            },
        )

    async def health(self, _: web.Request) -> web.Response:
        return self._reply(200, {"status": "ok"})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(SEND_TEXT, self.send)
        app.router.add_post(SEND_IMAGE, self.send)
        app.router.add_post(SEND_DOCUMENT, self.send)
        app.router.add_post(MARK_READ, self.markread)
        app.router.add_get(SESSION_STATUS, self.status)
        app.router.add_get("/_sim/faults", self.get_faults)
        app.router.add_put("/_sim/faults", self.put_faults)
        app.router.add_post("/_sim/reset", self.reset)
        app.router.add_get("/_sim/ledger", self.ledger)
        app.router.add_get("/health", self.health)
        return app

    @property
    def port(self) -> int:
        return self._port

    async def start(self, host: str, port: int) -> None:
        self.runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self.runner.setup()
        self.site = web.TCPSite(self.runner, host, port, reuse_address=True)
        await self.site.start()
        server = self.runner.server and self.runner.addresses
        self._port = int(server[0][1]) if server else port
        log.info("wuzapi_sim.started", url=f"http://{host}:{self.port}")

    async def stop(self) -> None:
        if self._down_task is not None:
            self._down_task.cancel()
        if self.runner is not None:
            await self.runner.cleanup()


async def serve(host: str, port: int, tokens: set[str] | None = None) -> None:
    """Run the simulator until cancelled (SIGTERM / SIGINT through asyncio.run)."""
    sim = WuzapiSimulator(tokens=tokens)
    await sim.start(host, port)
    try:
        await asyncio.Event().wait()
    finally:
        await sim.stop()
