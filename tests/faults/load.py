"""A bounded webhook load against a real ingest: unique request ids, every answer recorded."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import httpx
import orjson

from harness.meta_samples import sign, wa_change, wa_envelope, wa_message
from infra.postgres.tenants import Tenant


def webhook(sender: str, n: int) -> tuple[bytes, str]:
    wamid = f"wamid.{uuid.uuid4().hex}"
    envelope = wa_envelope(
        [
            wa_change(
                phone_number_id="1065",
                display_phone_number="15550001",
                contacts=[(sender, "Load")],
                messages=[wa_message("text", wamid=wamid, from_=sender, timestamp=1750000000 + n)],
            )
        ],
        waba_id="1022",
    )
    return orjson.dumps(envelope), wamid


@dataclass
class LoadResult:
    codes: Counter[int] = field(default_factory=Counter)
    accepted: dict[str, str] = field(default_factory=dict)  # request id -> wamid of a 200
    refused: set[str] = field(default_factory=set)
    sent: int = 0
    # (monotonic time sent, time answered, code) of each POST's last attempt.
    answers: list[tuple[float, float, int]] = field(default_factory=list)

    def within(self, start: float, end: float) -> Counter[int]:
        """The codes of the POSTs sent and answered wholly between `start` and `end`."""
        return Counter(code for sent, answered, code in self.answers if sent >= start and answered <= end)


async def run_load(
    url: str,
    tenant: Tenant,
    *,
    concurrency: int,
    total: int | None = None,
    duration_s: float | None = None,
    stop: asyncio.Event | None = None,
    contacts: int = 50,
    pause_s: float = 0.0,
    retries: int = 0,
    into: LoadResult | None = None,
) -> LoadResult:
    """POST signed webhooks until `total` are sent, `duration_s` passes or `stop` is set.
    A connection error counts as code 0 (nothing was promised). With `retries`, a 503 or a
    connection error is retried with the same body, as Meta does. `into` is filled as it goes."""
    result = into if into is not None else LoadResult()
    counter = itertools.count()
    deadline = time.monotonic() + duration_s if duration_s else None
    endpoint = f"{url}/webhooks/meta/{tenant.slug}"

    async def one(client: httpx.AsyncClient) -> None:
        while True:
            n = next(counter)
            if (
                (total is not None and n >= total)
                or (deadline and time.monotonic() > deadline)
                or (stop is not None and stop.is_set())
            ):
                return
            body, wamid = webhook(f"4917{n % contacts:08d}", n)
            request_id = uuid.uuid4().hex
            result.sent += 1
            headers = {"X-Hub-Signature-256": sign(body, tenant.app_secret), "X-Request-Id": request_id}
            for attempt in range(retries + 1):
                sent_at = time.monotonic()
                try:
                    code = (await client.post(endpoint, content=body, headers=headers)).status_code
                except httpx.TransportError:
                    code = 0
                if code not in (0, 503) or attempt == retries:
                    break
                await asyncio.sleep(0.2 * 2**attempt)
            result.codes[code] += 1
            result.answers.append((sent_at, time.monotonic(), code))
            if code == 200:
                result.accepted[request_id] = wamid
            else:
                result.refused.add(request_id)
            if pause_s:
                await asyncio.sleep(pause_s)

    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*(one(client) for _ in range(concurrency)))
    return result
