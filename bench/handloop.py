"""The worker's second baseline: a minimal hand-written aiokafka + asyncpg loop writing the same rows.

No Faust: `getmany` batches of up to `--batch` records, decoded, written in one transaction, the
offsets committed after it. Two writers:

- `store`: the worker's writer (processors.writer.RowWriter) applied record by record, a batch
  of one each: the price of not batching (the worker's former per-record SQL is gone);
- `sets`: the worker's writer over the whole batch, a fixed number of
  set-based statements per batch, with the next batch fetched and decoded while the database
  writes the previous one (one batch in flight, so offsets are still committed in order):
  the machine's ceiling.

It writes one JSON line per batch to stdout (`{"event": "bench.batch", "records": n, "t": ...}`)
and runs until SIGTERM.

    python -m bench.handloop --bootstrap HOST:PORT --database-url URL --group G [--writer sets]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from infra.kafka.topics import META_WEBHOOKS
from processors.autoreply import CompanyCache
from processors.rows import to_rows
from processors.webhooks import create_writer_pool
from processors.writer import RowWriter, load_companies
from schemas.records import WebhookRecord

WRITERS = ("store", "sets")


def emit(records: int) -> None:
    sys.stdout.write(
        orjson.dumps({"event": "bench.batch", "records": records, "t": time.time()}).decode() + "\n"
    )
    sys.stdout.flush()


async def run(
    bootstrap: str, database_url: str, group: str, *, writer: str, batch: int, overlap: bool
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    consumer = AIOKafkaConsumer(
        META_WEBHOOKS,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=batch,
        session_timeout_ms=6000,
        heartbeat_interval_ms=2000,
    )
    await consumer.start()
    pool = await create_writer_pool(database_url, min_size=2, max_size=4)
    companies = CompanyCache(30.0)

    async def write(records: list[WebhookRecord], offsets: dict[TopicPartition, int]) -> None:
        async with pool.acquire() as conn, conn.transaction():
            known = await load_companies(conn, companies, records)
            rows = RowWriter(conn)
            if writer == "sets":
                await rows.apply(to_rows(records, known))
            else:
                for record in records:
                    await rows.apply(to_rows([record], known))
        await consumer.commit(offsets)
        emit(len(records))

    pending: asyncio.Task[None] | None = None
    try:
        while not stop.is_set():
            got = await consumer.getmany(timeout_ms=100, max_records=batch)
            if not got:
                continue
            records = [WebhookRecord.from_bytes(m.value or b"") for msgs in got.values() for m in msgs]
            offsets = {tp: msgs[-1].offset + 1 for tp, msgs in got.items()}
            if pending is not None:
                await pending
            pending = asyncio.ensure_future(write(records, offsets))
            if not overlap:
                await pending
                pending = None
        if pending is not None:
            await pending
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending
        await consumer.stop()
        await pool.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--writer", choices=WRITERS, default="sets")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--no-overlap", action="store_true", help="write each batch before fetching the next")
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(
        run(
            args.bootstrap,
            args.database_url,
            args.group,
            writer=args.writer,
            batch=args.batch,
            overlap=not args.no_overlap,
        )
    )


if __name__ == "__main__":
    main()
