"""The WUZAPI client: one HTTP call per attempt, with its own timeouts, classified failures and a
circuit breaker per WUZAPI instance (token).

What a reply means (from WUZAPI's handlers): a timeout, a connection error, a 5xx or a
429 is transient (retried, and counted by the breaker); 401 is our configuration (permanent, with
an alert); any other 4xx is permanent. One 500 is about the file, not the gateway: SendImage's
"Could not decode image for thumbnail preparation" (a corrupt or mislabelled image; nothing was
sent), after which the same file is sent at once as a document, and no breaker counts it.
Retrying and waiting are the caller's (processors.outbound): this module makes one attempt and
says what happened.

An attachment goes inside the JSON body as a base64 data URL (the gateway takes no URL): the body
is streamed, read afresh from the caller's source for each attempt and encoded as it goes, so a
16 MB file is never whole in memory here. Such a call has its own deadline (`media_timeout_s`).

aiobreaker's limits, and what this module does about them: it knows no slow call, so every call
ends in a timeout that raises and counts; it caps no half-open trials, so a lock lets one probe
through at a time; it times its open state with naive UTC datetimes, so the time left is computed
here from those same naive UTC values.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import orjson
from aiobreaker import CircuitBreaker, CircuitBreakerError, CircuitBreakerListener, CircuitBreakerState
from prometheus_client import Counter, Gauge, Histogram

from infra.runtime.logging import get_logger
from schemas import wuzapi as contract
from schemas.outbound import MEDIA_KINDS, OutboundMessage
from schemas.wuzapi import instance_name

log = get_logger("processors.wuzapi")

CALLS = Counter("cortexx_wuzapi_calls_total", "WUZAPI calls by outcome", ["outcome"])
CALL_SECONDS = Histogram("cortexx_wuzapi_call_seconds", "WUZAPI call latency")
BREAKER_STATE = Gauge(
    "cortexx_wuzapi_breaker_open", "1 while the breaker of a WUZAPI instance is not closed", ["instance"]
)
BREAKER_TRANSITIONS = Counter(
    "cortexx_wuzapi_breaker_transitions_total", "Breaker state changes", ["instance", "state"]
)


class WuzapiError(Exception):
    """A WUZAPI call that did not succeed."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class WuzapiTransient(WuzapiError):
    """Worth retrying: timeouts, connection errors, 5xx, 429."""

    def __init__(self, message: str, *, status: int | None = None, retry_after_s: float | None = None):
        super().__init__(message, status=status)
        self.retry_after_s = retry_after_s


class WuzapiPermanent(WuzapiError):
    """Retrying cannot help: the request itself is refused (4xx)."""


class MediaUnavailable(WuzapiTransient):
    """The attachment could not be read during the attempt (its source raised: the cause): the
    body was cut off, so nothing was sent. Not the gateway's fault: excluded from the breaker,
    which (as for a 4xx) takes it as a call that did not fail."""


class ImageUndecodable(WuzapiPermanent):
    """SendImage could not decode the file for its thumbnail: nothing was sent, and retrying the
    same bytes as an image cannot help (as a document they can go)."""


class WuzapiUnauthorized(WuzapiPermanent):
    """The token is not a WUZAPI user: our configuration, not the message."""


class BreakerOpen(Exception):
    """The instance's breaker refused the call: nothing was sent, no attempt was spent."""

    def __init__(self, instance: str, wait_s: float) -> None:
        super().__init__(f"breaker of {instance} open for {wait_s:.2f}s more")
        self.instance = instance
        self.wait_s = wait_s


# A factory of the attachment's bytes: each call gives a fresh iterator from the start of the file.
MediaSource = Callable[[], AsyncIterator[bytes]]


@dataclass(frozen=True, slots=True)
class Upload:
    """A file streamed into the request: its base64 extends the data URL at `payload[field]`."""

    field: str
    chunks: MediaSource


class _SourceFailed(Exception):
    """Raised inside the streamed body when the attachment's source raises (the cause)."""


async def _read(source: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    while True:
        try:
            chunk = await anext(source)
        except StopAsyncIteration:
            return
        except Exception as exc:  # the store's own error, whatever it is: re-raised typed, not lost
            raise _SourceFailed(repr(exc)) from exc
        yield chunk


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(when.tzinfo)).total_seconds())


class _BreakerEvents(CircuitBreakerListener):  # type: ignore[misc]
    def __init__(self, on_change: Callable[[str, str, int], None]) -> None:
        self.on_change = on_change

    def state_change(self, breaker: CircuitBreaker, old: Any, new: Any) -> None:
        state = new.state.name.lower().replace("_", "-")
        instance = breaker.name or "unknown"
        BREAKER_STATE.labels(instance).set(0 if state == "closed" else 1)
        BREAKER_TRANSITIONS.labels(instance, state).inc()
        log.warning("wuzapi.breaker", instance=instance, state=state, failures=breaker.fail_counter)
        self.on_change(instance, state, breaker.fail_counter)


class WuzapiClient:
    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout_s: float,
        timeout_s: float,
        breaker_fail_max: int,
        breaker_reset_s: float,
        on_breaker_change: Callable[[str, str, int], None] | None = None,
        media_timeout_s: float = 120.0,
    ) -> None:
        """`media_timeout_s` bounds a whole call that carries a file: the upload to WUZAPI, its
        upload to WhatsApp and the answer. The default is the gateway's own http.Server
        WriteTimeout (main.go: 120 s), past which it cannot answer; its ReadTimeout (60 s) means
        the body itself must be through within a minute."""
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.media_timeout_s = media_timeout_s
        # Per phase too: waiting for the answer while WUZAPI uploads the file may take long.
        self._media_timeout = httpx.Timeout(media_timeout_s, connect=connect_timeout_s)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
        )
        self._fail_max = breaker_fail_max
        self._reset = timedelta(seconds=breaker_reset_s)
        self._listener = _BreakerEvents(on_breaker_change or (lambda *_: None))
        self._breakers: dict[str, CircuitBreaker] = {}
        self._probes: dict[str, asyncio.Lock] = {}

    async def close(self) -> None:
        await self._http.aclose()

    def breaker(self, token: str) -> CircuitBreaker:
        breaker = self._breakers.get(token)
        if breaker is None:
            breaker = CircuitBreaker(
                fail_max=self._fail_max,
                timeout_duration=self._reset,
                exclude=[WuzapiPermanent, MediaUnavailable],
                listeners=[self._listener],
                name=instance_name(token),
            )
            self._breakers[token] = breaker
            self._probes[token] = asyncio.Lock()
        return breaker

    def _time_left(self, breaker: CircuitBreaker) -> float:
        opened_at = breaker._state_storage.opened_at  # naive UTC, as aiobreaker stores it
        if opened_at is None:
            return 0.0
        left = opened_at + breaker.timeout_duration - datetime.utcnow()
        return max(0.0, float(left.total_seconds()))

    async def call(
        self, token: str, path: str, payload: dict[str, Any], upload: Upload | None = None
    ) -> dict[str, Any]:
        """One attempt through the instance's breaker, with `upload`'s file streamed into the
        payload if given. Raises BreakerOpen, WuzapiTransient (MediaUnavailable among them) or
        WuzapiPermanent; returns the reply's `data`."""
        breaker = self.breaker(token)
        if breaker.current_state is CircuitBreakerState.CLOSED:
            return await self._guarded(breaker, token, path, payload, upload)
        # Open or half-open: one probe at a time; the others wait for its verdict.
        async with self._probes[token]:
            if breaker.current_state is CircuitBreakerState.OPEN:
                left = self._time_left(breaker)
                if left > 0:
                    raise BreakerOpen(breaker.name, left)
            return await self._guarded(breaker, token, path, payload, upload)

    async def _guarded(
        self,
        breaker: CircuitBreaker,
        token: str,
        path: str,
        payload: dict[str, Any],
        upload: Upload | None,
    ) -> dict[str, Any]:
        try:
            result: dict[str, Any] = await breaker.call_async(self._request, token, path, payload, upload)
            return result
        except CircuitBreakerError as exc:
            raise BreakerOpen(breaker.name, self._time_left(breaker)) from exc.__cause__

    async def _request(
        self, token: str, path: str, payload: dict[str, Any], upload: Upload | None
    ) -> dict[str, Any]:
        started = asyncio.get_running_loop().time()
        deadline = self.timeout_s if upload is None else self.media_timeout_s
        headers = {contract.TOKEN_HEADER: token, "Content-Type": "application/json"}
        body = None if upload is None else self._streamed(payload, upload)
        try:
            # httpx's timeouts are per phase; this bounds the whole call, so a slow drip ends too.
            async with asyncio.timeout(deadline):
                if body is None:
                    response = await self._http.post(path, content=orjson.dumps(payload), headers=headers)
                else:
                    # No Content-Length: chunked, which Go's net/http reads as any body.
                    response = await self._http.post(
                        path, content=body, headers=headers, timeout=self._media_timeout
                    )
        except (TimeoutError, httpx.TimeoutException) as exc:
            CALLS.labels("timeout").inc()
            raise WuzapiTransient(f"timeout after {deadline}s on {path}") from exc
        except httpx.TransportError as exc:
            CALLS.labels("connection_error").inc()
            raise WuzapiTransient(f"{type(exc).__name__} on {path}: {exc}") from exc
        except _SourceFailed as exc:
            CALLS.labels("media_unavailable").inc()
            raise MediaUnavailable(f"the attachment could not be read for {path}: {exc}") from exc.__cause__
        finally:
            if body is not None:
                await body.aclose()  # ends the source too, whether or not it was read to its end
            CALL_SECONDS.observe(asyncio.get_running_loop().time() - started)
        return self._interpret(path, response)

    async def _streamed(self, payload: dict[str, Any], upload: Upload) -> AsyncGenerator[bytes, None]:
        source = upload.chunks()
        chunks = _read(source)
        pieces = contract.streamed_json(payload, upload.field, chunks)
        try:
            async for piece in pieces:
                yield piece
        finally:
            # Closed in order, now rather than by the garbage collector: the file is let go.
            await pieces.aclose()
            await chunks.aclose()
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                await aclose()

    def _interpret(self, path: str, response: httpx.Response) -> dict[str, Any]:
        status = response.status_code
        try:
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            body = {}
        error = str(body.get("error") or response.reason_phrase) if isinstance(body, dict) else ""
        if status == 200 and isinstance(body, dict) and body.get("success"):
            CALLS.labels("ok").inc()
            data = body.get("data")
            return data if isinstance(data, dict) else {}
        if status == 500 and error.startswith(contract.THUMBNAIL_FAILED):
            CALLS.labels("image_undecodable").inc()
            raise ImageUndecodable(f"{status} {error}", status=status)
        if status == 429 or status >= 500:
            CALLS.labels(f"{status // 100}xx" if status != 429 else "429").inc()
            raise WuzapiTransient(
                f"{status} {error}",
                status=status,
                retry_after_s=_retry_after(response.headers.get("retry-after")),
            )
        CALLS.labels("4xx").inc()
        if status == 401:
            log.error(
                "wuzapi.unauthorized",
                path=path,
                alert=True,
                detail="WUZAPI refused the token: check the company's wuzapi_token",
            )
            raise WuzapiUnauthorized(f"401 {error}", status=status)
        if status == 200:
            raise WuzapiPermanent(f"unexpected reply {body!r}", status=status)
        raise WuzapiPermanent(f"{status} {error}", status=status)

    async def send(self, token: str, message: OutboundMessage, media: MediaSource | None = None) -> None:
        """Send one outbound message under its gateway id (unique across companies) as WhatsApp's
        message id. An attachment (image, audio, video, document) needs `media`, a factory of a
        fresh iterator of the file's bytes, called once per attempt; it is sent as
        `schemas.wuzapi.media_route` says (what the gateway cannot send as its kind goes as a
        document)."""
        if message.kind == "text":
            payload = contract.text_request(message.to, message.text or "", message.gateway_id)
            await self.call(token, contract.SEND_TEXT, payload)
            return
        if message.kind == "markread":
            payload = contract.markread_request(list(message.read_ids), message.to)
            await self.call(token, contract.MARK_READ, payload)
            return
        if message.kind not in MEDIA_KINDS:
            raise WuzapiPermanent(f"no WUZAPI endpoint sends a {message.kind!r} message")
        if media is None:
            # A record from before attachments were streamed names only a media_url: the gateway
            # takes files as data URLs only and downloads nothing, so it cannot be sent.
            raise WuzapiPermanent(
                f"the {message.kind} reply has no attachment to stream (WUZAPI takes no URL)"
            )
        route = contract.media_route(message.kind, message.mime_type)
        if route.kind != message.kind:
            log.info("wuzapi.sent_as_document", id=message.id, kind=message.kind, mime_type=message.mime_type)
        try:
            await self._send_file(token, message, route, media)
        except ImageUndecodable as exc:
            if route.kind != "image":
                raise
            # Under the same id: SendImage fails before sending, so the id is still unused.
            log.warning(
                "wuzapi.image_sent_as_document", id=message.id, mime_type=message.mime_type, error=str(exc)
            )
            await self._send_file(token, message, contract.media_route("document", message.mime_type), media)

    async def _send_file(
        self, token: str, message: OutboundMessage, route: contract.MediaRoute, media: MediaSource
    ) -> None:
        payload = contract.media_request(
            route,
            message.to,
            message.gateway_id,
            caption=message.caption,
            filename=message.filename,
            mime_type=message.mime_type,
        )
        await self.call(token, route.path, payload, Upload(route.field, media))
