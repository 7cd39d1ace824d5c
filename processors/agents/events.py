"""A Faust event as the agents hand it over: a `RawRecord`, the record as it came off the topic."""

from __future__ import annotations

from typing import Any

from faust.types import EventT

from processors.webhooks import RawRecord


def raw_record(event: EventT[Any]) -> RawRecord:
    message = event.message
    return RawRecord(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value or b"",
        headers=_headers(message.headers),
    )


def _headers(headers: Any) -> list[tuple[str, bytes]]:
    if not headers:
        return []
    items = headers.items() if isinstance(headers, dict) else headers
    return [(str(k), v if isinstance(v, bytes) else str(v).encode()) for k, v in items]
