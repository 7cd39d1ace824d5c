"""A WUZAPI simulator: WUZAPI's HTTP contract for what Cortexx uses (asternic/wuzapi handlers.go),
with fault injection switched at run time and a ledger of what it delivered.

Users: the gateway knows a fixed set of tokens (`tokens`); any other token, or none, gets 401
`{"code":401,"error":"Unauthorized","success":false}` before anything else, as WUZAPI's auth
middleware answers. `any_token` (asked for explicitly) makes every non-empty token a user.

Faults (`PUT /_sim/faults`): an error rate answering a chosen status, added latency, hanging calls,
connections reset (`down`), a listener closed for a while (`down_for_s`), a lost WhatsApp session,
and per-phone forced statuses. `latency_ms` and `hang` stand for the WhatsApp round trip of a call
that passed auth and validation: a hung call waits until `hang` is cleared and then goes on (it is
delivered and answered), or is dropped, undelivered, when the simulator is reset or stopped.

Deliveries: WUZAPI sends with `context.Background()`, so a send it has begun is delivered whether
or not the caller is still waiting for the answer. It keeps no record of message ids; WhatsApp keys
a message by its chat and id, so a send of a known id to the same chat is the same message (a
resend: `requests` grows, `accepted` does not), while the same reply under another id is a second
message to the recipient. The ledger counts both, by id and by (phone, body), and lists as
`duplicates` what reached a recipient more than once.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn

import orjson
from aiohttp import web

from infra.runtime.logging import get_logger
from schemas.wuzapi import (
    MARK_READ,
    NO_SESSION,
    SEND_DOCUMENT,
    SEND_IMAGE,
    SEND_TEXT,
    SESSION_STATUS,
    TOKEN_HEADER,
    UNAUTHORIZED,
    error_envelope,
    ok_envelope,
)

log = get_logger("wuzapi_sim")

# How long a stop waits for calls still in flight before cancelling them; hung ones are woken
# (and dropped) at once, so this bounds only a handler that is stuck elsewhere.
SHUTDOWN_TIMEOUT_S = 1.0

WHATSAPP_SERVER = "@s.whatsapp.net"
_REQUIRED = {SEND_TEXT: "Body", SEND_IMAGE: "Image", SEND_DOCUMENT: "Document"}


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
    phone: str  # as first sent
    body: str | None  # Body, Caption or FileName of the first send
    accepted: int  # new messages under this id: one per chat it reached (1 unless an id is reused)
    requests: int  # sends of this id the gateway accepted, resends of the same message included
    first_at: float
    chats: list[str] = field(default_factory=list)  # the chats it reached, in order


@dataclass
class Content:
    """One (phone, body) and the ids it was delivered under: more than one is a double message."""

    phone: str
    path: str
    body: str | None
    media: str | None  # a digest of the Image / Document sent, if any
    ids: list[str] = field(default_factory=list)


_Handler = Callable[[web.Request, int], Awaitable[web.StreamResponse]]


class Dropped(Exception):
    """The call is dropped without an answer (its connection reset) and delivers nothing."""


def chat_of(phone: str) -> str:
    """The chat a Phone names, as WUZAPI's parseJID reads it: a leading + is dropped and a bare
    number is a user on the WhatsApp server."""
    phone = phone.removeprefix("+")
    return phone.removesuffix(WHATSAPP_SERVER) if phone.endswith(WHATSAPP_SERVER) else phone


class WuzapiSimulator:
    def __init__(
        self, *, tokens: Iterable[str] = (), any_token: bool = False, seed: int | None = None
    ) -> None:
        self.faults = Faults()
        # The gateway's users; with any_token, every non-empty token is one.
        self.tokens: set[str] = {t for t in tokens if t}
        self.any_token = any_token
        self.deliveries: dict[str, Delivery] = {}
        self.contents: dict[tuple[str, str, str | None, str | None], Content] = {}
        self.requests = 0
        self.errors = 0
        self.resends = 0
        self.random = random.Random(seed)
        self.site: web.TCPSite | None = None
        self.runner: web.AppRunner | None = None
        self._down_task: asyncio.Task[None] | None = None
        self._port = 0
        # A call that waits (latency, hang) wakes on every change of faults, a reset or the stop.
        self._changed = asyncio.Event()
        # Bumped by a reset: a call begun before it is dropped instead of delivered into the new ledger.
        self._epoch = 0
        self._stopping = False

    # The WUZAPI contract ---------------------------------------------------------------------

    def _reply(self, code: int, body: dict[str, Any]) -> web.Response:
        # As Go's json.Encoder writes a map: keys sorted, a newline after.
        payload = orjson.dumps(body, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE)
        return web.Response(body=payload, status=code, content_type="application/json")

    def _error(self, code: int, message: str, *, retry_after: float | None = None) -> web.Response:
        self.errors += 1
        response = self._reply(code, error_envelope(code, message))
        if retry_after is not None:
            response.headers["Retry-After"] = str(int(retry_after) if retry_after >= 1 else retry_after)
        return response

    def _drop(self, request: web.Request, why: str) -> NoReturn:
        # Reset the connection: to the client it is a gateway that is not there (or went away).
        if request.transport is not None:
            request.transport.abort()
        log.info("wuzapi_sim.dropped", path=request.path, why=why)
        raise Dropped(why)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _live(self, epoch: int) -> bool:
        return not self._stopping and epoch == self._epoch

    def authorized(self, request: web.Request) -> bool:
        # authalice: the Token header, else the token query parameter(s); no user for it: 401.
        token = request.headers.get(TOKEN_HEADER) or "".join(request.query.getall("token", []))
        return token in self.tokens or (self.any_token and bool(token))

    def _refused(self, request: web.Request) -> web.Response | None:
        """What every gateway call meets first: a reset connection (`down`), auth, the session."""
        self.requests += 1
        if self.faults.down:
            self._drop(request, "down")
        if not self.authorized(request):
            return self._error(401, UNAUTHORIZED)
        if self.faults.session_lost:
            return self._error(500, NO_SESSION)
        return None

    async def _round_trip(self, request: web.Request, epoch: int) -> None:
        """The WhatsApp part of a call: `latency_ms` long, held while `hang` is on. Raises Dropped
        when the simulator is reset or stopped meanwhile."""
        loop = asyncio.get_running_loop()
        until = loop.time() + self.faults.latency_ms / 1000
        while self._live(epoch):
            left = until - loop.time()
            if not self.faults.hang and left <= 0:
                return
            changed = self._changed
            try:
                async with asyncio.timeout(None if self.faults.hang else left):
                    await changed.wait()
            except TimeoutError:
                pass
        self._drop(request, "stopped" if self._stopping else "reset")

    def _erratic(self, failure: str) -> web.Response | None:
        faults = self.faults
        if faults.error_rate and self.random.random() < faults.error_rate:
            status = faults.error_status
            message = failure if status >= 500 else "simulated"
            return self._error(status, message, retry_after=faults.retry_after_s if status == 429 else None)
        return None

    async def _admitted_payload(self, request: web.Request) -> dict[str, Any] | web.Response:
        """A send's or markread's body, once the call got past `_refused`; else the refusal."""
        refused = self._refused(request)
        return refused if refused is not None else await self._payload(request)

    async def _payload(self, request: web.Request) -> dict[str, Any] | web.Response:
        try:
            payload = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return self._error(400, "Could not decode Payload")
        if not isinstance(payload, dict):
            return self._error(400, "Could not decode Payload")
        return payload

    async def _guarded(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        try:
            return await handler(request, self._epoch)
        except Dropped:
            # The connection is reset already: nothing can be answered on it.
            raise asyncio.CancelledError from None

    async def send(self, request: web.Request) -> web.StreamResponse:
        return await self._guarded(request, self._send)

    async def _send(self, request: web.Request, epoch: int) -> web.StreamResponse:
        payload = await self._admitted_payload(request)
        if isinstance(payload, web.Response):
            return payload
        phone = str(payload.get("Phone") or "")
        if not phone:
            return self._error(400, "Missing Phone in Payload")
        path = request.path
        required = _REQUIRED[path]
        if not payload.get(required):
            return self._error(400, f"Missing {required} in Payload")
        if path == SEND_DOCUMENT and not payload.get("FileName"):
            return self._error(400, "Missing FileName in Payload")
        forced = self.faults.fail_phones.get(phone)
        if forced is not None:
            message = {401: UNAUTHORIZED, 400: "Could not parse Phone"}.get(forced, "simulated")
            return self._error(forced, message if forced < 500 else "Error sending message: simulated")
        message_id = str(payload.get("Id") or f"{self.random.getrandbits(128):032X}")
        await self._round_trip(request, epoch)
        erratic = self._erratic("Error sending message: simulated failure")
        if erratic is not None:
            return erratic
        # Sent with context.Background(): delivered even if the caller gave up meanwhile.
        self._accept(message_id, path, phone, payload)
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return self._reply(200, ok_envelope({"Details": "Sent", "Id": message_id, "Timestamp": now}))

    def _accept(self, message_id: str, path: str, phone: str, payload: dict[str, Any]) -> None:
        chat = chat_of(phone)
        raw_body = payload.get("Body") or payload.get("Caption") or payload.get("FileName")
        body = None if raw_body is None else str(raw_body)
        media = payload.get("Image") or payload.get("Document")
        digest = hashlib.sha256(str(media).encode()).hexdigest()[:16] if media else None
        delivery = self.deliveries.get(message_id)
        if delivery is None:
            delivery = Delivery(message_id, path, phone, body, 0, 0, time.time())
            self.deliveries[message_id] = delivery
        delivery.requests += 1
        if chat in delivery.chats:
            # The same id to the same chat is the same WhatsApp message: the recipient has it once.
            self.resends += 1
            log.info("wuzapi_sim.resend", id=message_id, requests=delivery.requests)
            if (path, body) != (delivery.path, delivery.body):
                log.warning("wuzapi_sim.resend_differs", id=message_id, path=path)
            return
        delivery.chats.append(chat)
        delivery.accepted += 1
        if delivery.accepted > 1:
            log.warning("wuzapi_sim.id_reused", id=message_id, chats=delivery.chats)
        content = self.contents.setdefault((chat, path, body, digest), Content(chat, path, body, digest))
        content.ids.append(message_id)
        if len(content.ids) > 1:
            log.warning("wuzapi_sim.double_message", phone=chat, ids=content.ids)

    async def markread(self, request: web.Request) -> web.StreamResponse:
        return await self._guarded(request, self._markread)

    async def _markread(self, request: web.Request, epoch: int) -> web.StreamResponse:
        payload = await self._admitted_payload(request)
        if isinstance(payload, web.Response):
            return payload
        # WUZAPI checks Chat before Id.
        if not (payload.get("ChatPhone") or payload.get("Chat")):
            return self._error(400, "Missing Chat in Payload")
        ids = payload.get("Id")
        if not isinstance(ids, list) or not ids:
            return self._error(400, "Missing Id in Payload")
        await self._round_trip(request, epoch)
        erratic = self._erratic("Failure marking messages as read")
        if erratic is not None:
            return erratic
        return self._reply(200, ok_envelope({"Details": "Message(s) marked as read"}))

    async def status(self, request: web.Request) -> web.StreamResponse:
        return await self._guarded(request, self._status)

    async def _status(self, request: web.Request, epoch: int) -> web.StreamResponse:
        refused = self._refused(request)
        if refused is not None:
            return refused
        await self._round_trip(request, epoch)
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
        self._notify()  # a hang cleared lets its calls go on
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
        self.contents.clear()
        self.requests = self.errors = self.resends = 0
        self._epoch += 1  # calls still waiting are dropped, not delivered into the new ledger
        self._notify()
        return self._reply(200, {"status": "reset"})

    def ledger_view(self) -> dict[str, Any]:
        contents = [{**asdict(c), "delivered": len(c.ids)} for c in self.contents.values()]
        duplicates: list[dict[str, Any]] = [
            {"kind": "id", "id": d.id, "accepted": d.accepted, "chats": d.chats}
            for d in self.deliveries.values()
            if d.accepted > 1
        ]
        duplicates += [{"kind": "content", **c} for c in contents if c["delivered"] > 1]
        return {
            "requests": self.requests,
            "errors": self.errors,
            "delivered": sum(d.accepted for d in self.deliveries.values()),
            "resends": self.resends,
            "deliveries": {k: asdict(v) for k, v in self.deliveries.items()},
            "contents": contents,
            "duplicates": duplicates,
        }

    async def ledger(self, _: web.Request) -> web.Response:
        return self._reply(200, self.ledger_view())

    async def health(self, _: web.Request) -> web.Response:
        return self._reply(200, {"status": "ok"})

    async def _on_shutdown(self, _: web.Application) -> None:
        # However the runner is cleaned up, calls held by a hang or latency end now.
        self._stopping = True
        self._notify()

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
        app.on_shutdown.append(self._on_shutdown)
        return app

    @property
    def port(self) -> int:
        return self._port

    async def start(self, host: str, port: int) -> None:
        self.runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )
        await self.runner.setup()
        self.site = web.TCPSite(self.runner, host, port, reuse_address=True)
        await self.site.start()
        server = self.runner.server and self.runner.addresses
        self._port = int(server[0][1]) if server else port
        log.info(
            "wuzapi_sim.started",
            url=f"http://{host}:{self.port}",
            users=len(self.tokens),
            any_token=self.any_token,
        )

    async def stop(self) -> None:
        self._stopping = True
        self._notify()
        if self._down_task is not None:
            self._down_task.cancel()
        if self.runner is not None:
            await self.runner.cleanup()


async def serve(
    host: str,
    port: int,
    tokens: Iterable[str] = (),
    *,
    any_token: bool = False,
    stop: asyncio.Event | None = None,
) -> None:
    """Run the simulator until `stop` is set (or the task is cancelled)."""
    sim = WuzapiSimulator(tokens=tokens, any_token=any_token)
    await sim.start(host, port)
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        await sim.stop()
