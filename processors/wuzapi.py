"""The WUZAPI client: one HTTP call per attempt, with its own timeouts, classified failures and a
circuit breaker per WUZAPI instance (token).

What a reply means (from WUZAPI's handlers): a timeout, a connection error, a 5xx or a
429 is transient (retried, and counted by the breaker); 401 is our configuration (permanent, with
an alert); any other 4xx is permanent. Retrying and waiting are the caller's (processors.outbound):
this module makes one attempt and says what happened.

aiobreaker's limits, and what this module does about them: it knows no slow call, so every call
ends in a timeout that raises and counts; it caps no half-open trials, so a lock lets one probe
through at a time; it times its open state with naive UTC datetimes, so the time left is computed
here from those same naive UTC values.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import orjson
from aiobreaker import CircuitBreaker, CircuitBreakerError, CircuitBreakerListener, CircuitBreakerState
from prometheus_client import Counter, Gauge, Histogram

from infra.runtime.logging import get_logger
from schemas import wuzapi as contract
from schemas.outbound import OutboundMessage
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


class WuzapiUnauthorized(WuzapiPermanent):
    """The token is not a WUZAPI user: our configuration, not the message."""


class BreakerOpen(Exception):
    """The instance's breaker refused the call: nothing was sent, no attempt was spent."""

    def __init__(self, instance: str, wait_s: float) -> None:
        super().__init__(f"breaker of {instance} open for {wait_s:.2f}s more")
        self.instance = instance
        self.wait_s = wait_s


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
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
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
                exclude=[WuzapiPermanent],
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

    async def call(self, token: str, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """One attempt through the instance's breaker. Raises BreakerOpen, WuzapiTransient or
        WuzapiPermanent; returns the reply's `data`."""
        breaker = self.breaker(token)
        if breaker.current_state is CircuitBreakerState.CLOSED:
            return await self._guarded(breaker, token, path, payload)
        # Open or half-open: one probe at a time; the others wait for its verdict.
        async with self._probes[token]:
            if breaker.current_state is CircuitBreakerState.OPEN:
                left = self._time_left(breaker)
                if left > 0:
                    raise BreakerOpen(breaker.name, left)
            return await self._guarded(breaker, token, path, payload)

    async def _guarded(
        self, breaker: CircuitBreaker, token: str, path: str, payload: dict[str, Any]
    ) -> dict[str, Any]:
        try:
            result: dict[str, Any] = await breaker.call_async(self._request, token, path, payload)
            return result
        except CircuitBreakerError as exc:
            raise BreakerOpen(breaker.name, self._time_left(breaker)) from exc.__cause__

    async def _request(self, token: str, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        started = asyncio.get_running_loop().time()
        try:
            # httpx's timeouts are per phase; this bounds the whole call, so a slow drip ends too.
            async with asyncio.timeout(self.timeout_s):
                response = await self._http.post(
                    path,
                    content=orjson.dumps(payload),
                    headers={contract.TOKEN_HEADER: token, "Content-Type": "application/json"},
                )
        except (TimeoutError, httpx.TimeoutException) as exc:
            CALLS.labels("timeout").inc()
            raise WuzapiTransient(f"timeout after {self.timeout_s}s on {path}") from exc
        except httpx.TransportError as exc:
            CALLS.labels("connection_error").inc()
            raise WuzapiTransient(f"{type(exc).__name__} on {path}: {exc}") from exc
        finally:
            CALL_SECONDS.observe(asyncio.get_running_loop().time() - started)
        return self._interpret(path, response)

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

    async def send(self, token: str, message: OutboundMessage) -> None:
        """Send one outbound message under its gateway id (unique across companies) as WhatsApp's
        message id."""
        if message.kind == "text":
            path, payload = (
                contract.SEND_TEXT,
                contract.text_request(message.to, message.text or "", message.gateway_id),
            )
        elif message.kind == "image":
            path = contract.SEND_IMAGE
            payload = contract.image_request(
                message.to, message.media_url or "", message.caption, message.gateway_id
            )
        elif message.kind == "document":
            path = contract.SEND_DOCUMENT
            payload = contract.document_request(
                message.to, message.media_url or "", message.filename or "document", message.gateway_id
            )
        else:
            path, payload = contract.MARK_READ, contract.markread_request(list(message.read_ids), message.to)
        await self.call(token, path, payload)
