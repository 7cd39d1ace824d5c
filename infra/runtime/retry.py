"""Retrying until it passes: for the writes a process must not drop (a dead letter, an auto-reply
record, a reply's status row), an outage of the broker or of Postgres is waited out with capped
exponential backoff and jitter (tenacity), each wait logged; any other error is raised at once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential_jitter

from infra.runtime.logging import get_logger

log = get_logger("retry")

T = TypeVar("T")


async def until_it_passes(
    call: Callable[[], Awaitable[T]],
    *,
    retry_if: Callable[[BaseException], bool],
    event: str,
    initial_s: float = 0.2,
    max_s: float = 5.0,
    **context: Any,
) -> T:
    """`await call()` until it returns; `retry_if(error)` says which errors are waited out.

    Each wait is logged as `event`, with `context` (the topic, the tenant, ...) and the error."""

    def before_sleep(state: RetryCallState) -> None:
        outcome = state.outcome
        error = outcome.exception() if outcome is not None else None
        log.warning(event, attempt=state.attempt_number, error=repr(error), **context)

    async for attempt in AsyncRetrying(
        retry=retry_if_exception(retry_if),
        wait=wait_exponential_jitter(multiplier=initial_s, max=max_s),
        before_sleep=before_sleep,
        reraise=True,
    ):
        with attempt:
            return await call()
    raise AssertionError("unreachable: tenacity returns or re-raises")
