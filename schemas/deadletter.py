"""Dead-letter records: the original record, untouched, plus the error that stopped it."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import orjson

DEAD_LETTER_VERSION = 1

# Headers a replayed record carries, so a new failure continues the history it already had.
HEADER_REPLAY_OF = "cortexx-replay-of"
HEADER_ATTEMPTS = "cortexx-attempts"
HEADER_HISTORY = "cortexx-failures"


def _b64(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(raw).decode()


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


@dataclass(frozen=True, slots=True)
class FailureInfo:
    type: str
    message: str
    attempts: int
    first_failure_ms: int
    last_failure_ms: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Key, value and headers are kept byte for byte (base64), so a replay sends the original."""

    source_topic: str
    source_partition: int
    source_offset: int
    key_b64: str | None
    value_b64: str
    headers: list[tuple[str, str | None]]
    error: FailureInfo
    tenant: str | None = None
    v: int = DEAD_LETTER_VERSION
    history: list[FailureInfo] = field(default_factory=list)

    @classmethod
    def of(
        cls,
        *,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes,
        headers: list[tuple[str, bytes]],
        error: FailureInfo,
        tenant: str | None,
        history: list[FailureInfo] | None = None,
    ) -> DeadLetter:
        return cls(
            source_topic=topic,
            source_partition=partition,
            source_offset=offset,
            key_b64=_b64(key),
            value_b64=_b64(value) or "",
            headers=[(k, _b64(v)) for k, v in headers],
            error=error,
            tenant=tenant,
            history=list(history or []),
        )

    @property
    def key(self) -> bytes | None:
        return _unb64(self.key_b64)

    @property
    def value(self) -> bytes:
        return _unb64(self.value_b64) or b""

    def header_bytes(self) -> list[tuple[str, bytes | None]]:
        return [(k, _unb64(v)) for k, v in self.headers]

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            self
        )  # orjson serialises dataclasses natively: same bytes, ~40x faster than asdict

    @classmethod
    def from_bytes(cls, raw: bytes) -> DeadLetter:
        doc: dict[str, Any] = orjson.loads(raw)
        doc["error"] = FailureInfo(**doc["error"])
        doc["history"] = [FailureInfo(**h) for h in doc.get("history", [])]
        doc["headers"] = [tuple(h) for h in doc.get("headers", [])]
        return cls(**doc)


def replay_headers(letter: DeadLetter, dlq_id: str) -> list[tuple[str, bytes]]:
    """The original headers, minus our bookkeeping, plus the history so far."""
    ours = {HEADER_REPLAY_OF, HEADER_ATTEMPTS, HEADER_HISTORY}
    original = [(k, v or b"") for k, v in letter.header_bytes() if k not in ours]
    history = [*letter.history, letter.error]
    return [
        *original,
        (HEADER_REPLAY_OF, dlq_id.encode()),
        (HEADER_ATTEMPTS, str(letter.error.attempts).encode()),
        (HEADER_HISTORY, orjson.dumps(history)),
    ]
