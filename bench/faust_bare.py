"""The worker's first baseline: a bare Faust agent on `meta.webhooks` that only decodes each record.

The same Faust settings as the `cortexx worker` app (processors/app.py), no database, no
producer: what remains is Faust's own per-event cost, the ceiling of any Faust agent here.
It writes one JSON line per batch to stdout (`{"event": "bench.batch", "records": n, "t": ...}`)
and runs until stopped.

    python -m bench.faust_bare --bootstrap HOST:PORT --group G [--mode take --batch 2000]
        [--setting stream_buffer_maxsize=16384 ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

import faust
import orjson

from infra.kafka.topics import META_WEBHOOKS
from schemas.records import WebhookRecord

MODES = ("take", "noack_take", "events")


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def create_app(
    bootstrap: str,
    group: str,
    *,
    mode: str,
    batch: int,
    within: float,
    extra: dict[str, Any],
) -> faust.App:
    settings: dict[str, Any] = {
        "broker": f"kafka://{bootstrap}",
        "store": "memory://",
        "value_serializer": "raw",
        "key_serializer": "raw",
        "topic_disable_leader": True,
        "topic_allow_declare": False,
        "topic_partitions": 4,
        "consumer_auto_offset_reset": "earliest",
        "broker_session_timeout": 6.0,
        "broker_heartbeat_interval": 2.0,
        "broker_commit_every": batch,
        "broker_commit_interval": 1.0,
        "web_enabled": False,
        "worker_redirect_stdouts": False,
        # Faust's table directory, under the benchmark's own data dir (the default is the cwd).
        "datadir": os.path.join(os.environ.get("CORTEXX_DATA_DIR", tempfile.gettempdir()), f"faust-{group}"),
    }
    settings.update(extra)
    app = faust.App(group, **settings)
    topic = app.topic(META_WEBHOOKS, value_serializer="raw", key_serializer="raw")
    out = sys.stdout

    def emit(records: int) -> None:
        out.write(
            orjson.dumps({"event": "bench.batch", "records": records, "t": time.time()}).decode() + "\n"
        )
        out.flush()

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def on_assigned(sender: faust.App, assigned: set[Any], **_: Any) -> None:
        # The worker's own event, so that the benchmark can tell when a group has settled.
        line = {
            "event": "worker.partitions_assigned",
            "partitions": sorted(f"{tp.topic}:{tp.partition}" for tp in assigned),
        }
        out.write(orjson.dumps(line).decode() + "\n")
        out.flush()

    @app.agent(topic, name="bare")
    async def bare(stream: faust.StreamT[Any]) -> None:
        if mode == "take":
            async for values in stream.take(batch, within=within):
                for value in values:
                    WebhookRecord.from_bytes(value)
                emit(len(values))
        elif mode == "noack_take":
            # What the worker does: events kept, acknowledged after the batch is handled.
            async for events in stream.noack_take(batch, within=within):  # type: ignore[attr-defined]
                for event in events:
                    WebhookRecord.from_bytes(event.message.value)
                for event in events:
                    await stream.ack(event)
                emit(len(events))
        else:
            async for event in stream.events():
                WebhookRecord.from_bytes(event.message.value)
                pending[0] += 1
                if pending[0] == batch:
                    emit(pending[0])
                    pending[0] = 0

    pending = [0]  # events mode: decoded, not yet reported

    @app.timer(0.1)  # type: ignore[untyped-decorator]
    async def flush() -> None:
        if pending[0]:
            emit(pending[0])
            pending[0] = 0

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--mode", choices=MODES, default="take")
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--within", type=float, default=0.05)
    parser.add_argument("--setting", action="append", default=[], help="a Faust setting, name=value")
    parser.add_argument("--uvloop", action="store_true", help="run Faust on uvloop (mode.loop.use)")
    args = parser.parse_args(argv)
    if args.uvloop:
        import mode.loop

        mode.loop.use("uvloop")
    extra = {name: _value(value) for name, _, value in (s.partition("=") for s in args.setting)}
    app = create_app(
        args.bootstrap,
        args.group,
        mode=args.mode,
        batch=args.batch,
        within=args.within,
        extra=extra,
    )
    from faust.worker import Worker

    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    Worker(app, loglevel="warning", quiet=True).execute_from_commandline()


if __name__ == "__main__":
    main()
