"""A Postgres wire proxy for tests: a process's connections to Postgres go through it, and it
reads the protocol as it passes. It records every statement text the client sends (simple Query
and Parse messages), every change of a reported parameter after the start-up (ParameterStatus),
and the transaction status of every ReadyForQuery; and it can run a query of its own on an idle
connection, which the client never sees (its answer is not forwarded), to ask the session about
itself: what a pooled connection carries from one request to the next.

TLS and GSS encryption requests are answered "no" by the proxy itself, so the protocol stays
readable; a client that insists on TLS cannot connect through it.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
# Messages of an extended-query exchange: until its Sync, the connection is mid-exchange.
_EXTENDED = frozenset(b"PBEDCH")


class ProbeError(RuntimeError):
    """The proxy's own query failed, or the connection never became idle for it."""


@dataclass(eq=False)
class WireConnection:
    """One client connection and what passed on it."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    statements: list[str] = field(default_factory=list)
    parameter_changes: list[tuple[str, str]] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)  # each ReadyForQuery's: I, T or E
    ready: bool = False  # past the start-up (its first ReadyForQuery)
    closed: bool = False
    pending: int = 0  # Queries and Syncs sent that the server has not answered with ReadyForQuery
    extended: bool = False  # an extended-query exchange not yet closed by its Sync
    gate: asyncio.Lock = field(default_factory=asyncio.Lock)  # held: nothing the client sends passes
    probe: asyncio.Queue[tuple[bytes, bytes]] | None = None

    @property
    def status(self) -> str:
        return self.statuses[-1] if self.statuses else ""

    @property
    def idle(self) -> bool:
        """Between requests: no exchange open, every one answered, no transaction."""
        return (
            self.ready and not self.closed and self.pending == 0 and not self.extended and self.status == "I"
        )


def _cstrings(body: bytes, n: int) -> list[str]:
    return [part.decode() for part in body.split(b"\0", n)[:n]]


def _data_row(body: bytes) -> list[str | None]:
    values: list[str | None] = []
    offset = 2
    for _ in range(int.from_bytes(body[:2], "big")):
        length = int.from_bytes(body[offset : offset + 4], "big", signed=True)
        offset += 4
        if length < 0:
            values.append(None)
        else:
            values.append(body[offset : offset + length].decode())
            offset += length
    return values


def _error(body: bytes) -> str:
    fields = {part[:1]: part[1:].decode(errors="replace") for part in body.split(b"\0") if part}
    return f"{fields.get(b'C', '?')}: {fields.get(b'M', '?')}"


class WireRecorder:
    """Listens on 127.0.0.1 and forwards every connection to `host`:`port`."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.listen_port = 0
        self.connections: list[WireConnection] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def for_url(cls, url: str) -> WireRecorder:
        parts = urlsplit(url)
        assert parts.hostname and parts.port, f"a TCP Postgres URL, not {url}"
        return cls(parts.hostname, parts.port)

    def url(self, url: str) -> str:
        """`url` with its host and port replaced by the proxy's."""
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.listen_port}" if userinfo else f"127.0.0.1:{self.listen_port}"
        return urlunsplit(parts._replace(netloc=netloc))

    @property
    def statements(self) -> list[str]:
        return [s for c in self.connections for s in c.statements]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.listen_port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in self.connections:
            conn.client.close()
            conn.server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _accept(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        server_reader, server = await asyncio.open_connection(self.host, self.port)
        conn = WireConnection(client, server)
        self.connections.append(conn)
        up = asyncio.create_task(self._client_to_server(conn, client_reader))
        down = asyncio.create_task(self._server_to_client(conn, server_reader))
        for task in (up, down):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        finally:
            conn.closed = True
            client.close()
            server.close()
            up.cancel()
            down.cancel()

    async def _client_to_server(self, conn: WireConnection, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:  # the start-up: untyped messages, an encryption request perhaps first
                head = await reader.readexactly(4)
                body = await reader.readexactly(int.from_bytes(head, "big") - 4)
                code = int.from_bytes(body[:4], "big")
                if code in (SSL_REQUEST, GSSENC_REQUEST):
                    conn.client.write(b"N")  # no encryption: the protocol stays readable
                    await conn.client.drain()
                    continue
                conn.server.write(head + body)
                await conn.server.drain()
                if code == CANCEL_REQUEST:
                    return
                break
            while True:
                kind = await reader.readexactly(1)
                head = await reader.readexactly(4)
                body = await reader.readexactly(int.from_bytes(head, "big") - 4)
                async with conn.gate:
                    if kind == b"Q":
                        conn.statements.append(body[:-1].decode())
                        conn.pending += 1
                    elif kind == b"P":
                        conn.statements.append(_cstrings(body, 2)[1])
                    if kind == b"S":
                        conn.pending += 1
                        conn.extended = False
                    elif kind[0] in _EXTENDED:
                        conn.extended = True
                    conn.server.write(kind + head + body)
                    await conn.server.drain()
                if kind == b"X":
                    return

    async def _server_to_client(self, conn: WireConnection, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                kind = await reader.readexactly(1)
                head = await reader.readexactly(4)
                body = await reader.readexactly(int.from_bytes(head, "big") - 4)
                if conn.probe is not None:
                    conn.probe.put_nowait((kind, body))  # the proxy's own query's answer
                    continue
                if kind == b"Z":
                    conn.statuses.append(body[:1].decode())
                    if conn.ready:
                        conn.pending -= 1
                    conn.ready = True
                elif kind == b"S" and conn.ready:
                    name, value = _cstrings(body, 2)
                    conn.parameter_changes.append((name, value))
                conn.client.write(kind + head + body)
                await conn.client.drain()

    async def probe(
        self, sql: str, *, timeout_s: float = 10.0
    ) -> list[tuple[WireConnection, list[list[str | None]]]]:
        """Run `sql` (one simple query) on every open connection once it is idle, the client held
        back meanwhile; its rows per connection. A connection not idle within `timeout_s` (a
        transaction left open, say) is a ProbeError."""
        return [
            (conn, await self._probe(conn, sql, timeout_s))
            for conn in self.connections
            if conn.ready and not conn.closed
        ]

    async def _probe(self, conn: WireConnection, sql: str, timeout_s: float) -> list[list[str | None]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            async with conn.gate:
                if conn.idle:
                    return await self._run(conn, sql, deadline)
            if loop.time() > deadline:
                raise ProbeError(
                    f"connection never idle: status {conn.status!r}, {conn.pending} unanswered,"
                    f" mid-exchange {conn.extended}"
                )
            await asyncio.sleep(0.02)

    async def _run(self, conn: WireConnection, sql: str, deadline: float) -> list[list[str | None]]:
        queue: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue()
        conn.probe = queue
        rows: list[list[str | None]] = []
        error: str | None = None
        try:
            payload = sql.encode() + b"\0"
            conn.server.write(b"Q" + (len(payload) + 4).to_bytes(4, "big") + payload)
            await conn.server.drain()
            loop = asyncio.get_running_loop()
            while True:
                kind, body = await asyncio.wait_for(queue.get(), max(deadline - loop.time(), 0.1))
                if kind == b"D":
                    rows.append(_data_row(body))
                elif kind == b"E":
                    error = _error(body)
                elif kind == b"Z":
                    if body[:1] != b"I":
                        raise ProbeError(f"the probe left the connection in status {body[:1]!r}")
                    break
        finally:
            conn.probe = None
        if error is not None:
            raise ProbeError(f"the probe failed: {error}")
        return rows
