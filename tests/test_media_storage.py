"""The media store (infra/storage) against both of its stores: the local disk in a temporary
directory and S3 on moto's server (harness/s3_server.py, a child process). Every test runs on
both, and asserts what a caller sees: the bytes and their hash, the sizes, the errors, and what
is left in the directory or the bucket (objects, staging files, incomplete multipart uploads)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import hashlib
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import obstore as obs
import psutil
import pytest
from obstore.store import S3Store
from pydantic import SecretStr

from harness.s3_server import S3Server
from infra.runtime.settings import Settings
from infra.storage import (
    CHUNK_BYTES,
    PART_BYTES,
    MediaNotFound,
    MediaStore,
    RangeNotSatisfiable,
    StoredObject,
    StoreUnavailable,
)
from tests.support import wait_until

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@dataclass
class Kit:
    """A store under test, and a look behind it at what it really holds."""

    store: MediaStore
    root: Path | None = None  # the local store's directory
    server: S3Server | None = None
    bucket: str = ""

    def leftovers(self) -> list[str]:
        """Everything the store holds: files (staging ones too), or objects and incomplete
        multipart uploads."""
        if self.root is not None:
            return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if not p.is_dir())
        assert self.server is not None
        raw = S3Store(
            self.bucket,
            endpoint=self.server.endpoint,
            region=self.server.region,
            access_key_id=self.server.access_key_id,
            secret_access_key=self.server.secret_access_key,
            client_options={"allow_http": True},
        )
        objects = [meta["path"] for batch in obs.list(raw) for meta in batch]
        uploads = self.server.incomplete_uploads(self.bucket)
        return sorted(objects) + [f"<incomplete upload {n}>" for n in range(uploads)]

    def held(self, key: str) -> str:
        """What leftovers() names the object under `key`."""
        return key if self.root is not None else f"pre/{key}"


def s3_store(server: S3Server, url: str) -> MediaStore:
    return MediaStore.from_url(
        url,
        endpoint=server.endpoint,
        region=server.region,
        access_key_id=server.access_key_id,
        secret_access_key=server.secret_access_key,
    )


@pytest.fixture(params=["local", "s3"])
def kit(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Kit]:
    if request.param == "local":
        root = tmp_path / "media"
        yield Kit(MediaStore.from_url(root.as_uri()), root=root)
        return
    server: S3Server = request.getfixturevalue("s3_server")
    bucket = f"media-{uuid.uuid4().hex[:12]}"
    server.create_bucket(bucket)
    yield Kit(s3_store(server, f"s3://{bucket}/pre"), server=server, bucket=bucket)


def key() -> str:
    return f"42/{uuid.uuid4()}"


async def chunks_of(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for at in range(0, len(data), size):
        yield data[at : at + size]
        await asyncio.sleep(0)


async def read_all(opened: StoredObject) -> bytes:
    out = bytearray()
    async for chunk in opened.chunks():
        assert 0 < len(chunk) <= CHUNK_BYTES
        out += chunk
    return bytes(out)


class Broken(Exception):
    """The caller's own failure, mid-stream (a download cut, a hash that did not match)."""


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


@contextlib.contextmanager
def peak_rss_growth() -> Iterator[list[int]]:
    """The process's resident memory at its highest above where it began, sampled every 2 ms
    (obstore's buffers are Rust's, which tracemalloc never sees). Yields a list that holds the
    growth in bytes once the block ends."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS: a fair baseline
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], _rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    growth: list[int] = []
    try:
        yield growth
    finally:
        done.set()
        sampler.join()
        growth.append(max(peak[0], _rss()) - base)


# First in the file: no earlier test's freed heap to hide the growth in.
async def test_a_100_mb_upload_streams_through_bounded_memory_and_reads_back_whole(kit: Kit) -> None:
    size = 100 * MIB
    sent = hashlib.sha256()

    async def download() -> AsyncIterator[bytes]:
        for _ in range(size // MIB):
            chunk = os.urandom(MIB)
            sent.update(chunk)
            yield chunk

    name = key()
    started = time.monotonic()
    with peak_rss_growth() as upload_growth:
        assert await kit.store.put(name, download(), content_type="video/mp4") == size
    uploaded_s = time.monotonic() - started
    got = hashlib.sha256()
    with peak_rss_growth() as read_growth:
        async with await kit.store.open(name) as opened:
            assert (opened.size, opened.start, opened.end) == (size, 0, size - 1)
            async for chunk in opened.chunks():
                assert len(chunk) <= CHUNK_BYTES
                got.update(chunk)
    assert got.hexdigest() == sent.hexdigest()
    print(
        f"\n{kit.store.kind}: 100 MB put in {uploaded_s:.2f}s, RSS +{upload_growth[0] / MIB:.1f} MB; "
        f"read back RSS +{read_growth[0] / MIB:.1f} MB"
    )
    # Parts of 8 MiB, two in flight and one filling: ~24 MiB. Buffered whole, it would be 100+.
    assert upload_growth[0] < 60 * MIB
    assert read_growth[0] < 60 * MIB


@pytest.mark.parametrize(
    "size",
    [0, 1, 300 * 1024 + 7, PART_BYTES, PART_BYTES + 1, 2 * PART_BYTES + 12_345],
    ids=["empty", "1B", "300KiB", "one-part", "part+1", "2parts+"],
)
async def test_what_is_put_is_what_is_read(kit: Kit, size: int) -> None:
    data = os.urandom(size)
    name = key()
    # Odd chunk sizes, so that parts never line up with what the caller yields.
    assert await kit.store.put(name, chunks_of(data, 100_003), content_type="image/jpeg") == size
    assert await kit.store.size(name) == size
    opened = await kit.store.open(name)
    assert (opened.size, opened.start, opened.end, opened.length) == (size, 0, size - 1, size)
    assert opened.content_type == ("image/jpeg" if kit.store.kind == "s3" else None)
    assert hashlib.sha256(await read_all(opened)).hexdigest() == hashlib.sha256(data).hexdigest()
    assert kit.leftovers() == [kit.held(name)]


async def test_a_put_replaces_the_object_whole(kit: Kit) -> None:
    name = key()
    await kit.store.put(name, chunks_of(os.urandom(3 * MIB)))
    second = os.urandom(PART_BYTES + 5)
    await kit.store.put(name, chunks_of(second))
    assert await read_all(await kit.store.open(name)) == second
    assert kit.leftovers() == [kit.held(name)]


async def test_a_read_sees_one_version_while_the_object_is_replaced(kit: Kit) -> None:
    name = key()
    old, new = os.urandom(4 * MIB), os.urandom(4 * MIB)
    await kit.store.put(name, chunks_of(old))
    opened = await kit.store.open(name)
    reader = opened.chunks()
    first = await anext(reader)
    await kit.store.put(name, chunks_of(new))
    assert first + b"".join([chunk async for chunk in reader]) == old
    assert await read_all(await kit.store.open(name)) == new


async def test_ranged_reads_answer_like_http_range(kit: Kit) -> None:
    size = 1 * MIB + 333
    data = os.urandom(size)
    name = key()
    await kit.store.put(name, chunks_of(data))

    async def ranged(**bounds: int) -> tuple[int, int, int, bytes]:
        opened = await kit.store.open(name, **bounds)
        return opened.size, opened.start, opened.end, await read_all(opened)

    assert await ranged(start=0, end=99) == (size, 0, 99, data[:100])  # first bytes
    assert await ranged(start=500_000, end=700_000) == (size, 500_000, 700_000, data[500_000:700_001])
    assert await ranged(start=size - 100) == (size, size - 100, size - 1, data[-100:])  # bytes=N-
    assert await ranged(suffix=100) == (size, size - 100, size - 1, data[-100:])  # bytes=-100
    assert await ranged(suffix=10 * size) == (size, 0, size - 1, data)  # a suffix longer: all
    assert await ranged(start=size - 10, end=size + 1000) == (size, size - 10, size - 1, data[-10:])
    assert await ranged(start=size - 1, end=size - 1) == (size, size - 1, size - 1, data[-1:])
    for past in ({"start": size}, {"start": size + 5, "end": size + 10}):
        with pytest.raises(RangeNotSatisfiable) as refused:
            await kit.store.open(name, **past)
        assert refused.value.size == size  # for the 416's Content-Range: bytes */size
    for bad in ({"start": 10, "end": 9}, {"start": -1}, {"suffix": 0}, {"start": 0, "suffix": 5}):
        with pytest.raises(ValueError):
            await kit.store.open(name, **bad)

    empty = key()
    await kit.store.put(empty, chunks_of(b""))
    whole = await kit.store.open(empty)
    assert (whole.size, whole.length, await read_all(whole)) == (0, 0, b"")
    for bounds in ({"start": 0}, {"start": 0, "end": 0}, {"suffix": 1}):
        with pytest.raises(RangeNotSatisfiable) as refused:
            await kit.store.open(empty, **bounds)
        assert refused.value.size == 0
    with pytest.raises(MediaNotFound):
        await kit.store.open(key(), start=0, end=10)


# Failing before the first byte, within the first part (one PUT), exactly on a part boundary,
# and mid-way through the third part (a multipart upload with parts already sent).
@pytest.mark.parametrize("fail_after", [0, 3, 64, 70], ids=["at-once", "small", "on-boundary", "mid-part"])
async def test_a_failed_upload_leaves_nothing_and_keeps_the_object_it_would_replace(
    kit: Kit, fail_after: int
) -> None:
    kept = os.urandom(2 * MIB)
    name, fresh = key(), key()
    await kit.store.put(name, chunks_of(kept))
    cause = Broken("the download was cut")

    async def cut_short() -> AsyncIterator[bytes]:
        for _ in range(fail_after):
            yield os.urandom(256 * 1024)
            await asyncio.sleep(0)
        raise cause

    for target in (name, fresh):
        with pytest.raises(Broken) as raised:
            await kit.store.put(target, cut_short())
        assert raised.value is cause  # the caller's own exception, unchanged
    assert await read_all(await kit.store.open(name)) == kept
    assert await kit.store.size(fresh) is None
    # No partial object, no staging file (`<key>#<n>`), no multipart upload left open.
    assert kit.leftovers() == [kit.held(name)]


async def test_a_cancelled_upload_is_aborted_and_leaves_nothing(kit: Kit) -> None:
    name = key()
    sent = 0
    reached = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        nonlocal sent
        while True:
            yield os.urandom(MIB)
            sent += MIB
            if sent > 2 * PART_BYTES:  # parts are on the store by now
                reached.set()
            await asyncio.sleep(0.005)

    upload = asyncio.create_task(kit.store.put(name, slow()))
    await asyncio.wait_for(reached.wait(), 20)
    upload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await upload
    assert await kit.store.size(name) is None
    assert kit.leftovers() == []


async def test_delete_and_what_is_absent(kit: Kit) -> None:
    name = key()
    await kit.store.put(name, chunks_of(b"hello"))
    await kit.store.delete(name)
    assert await kit.store.size(name) is None
    with pytest.raises(MediaNotFound) as missing:
        await kit.store.open(name)
    assert missing.value.key == name
    await kit.store.delete(name)  # absent already: fine
    await kit.store.delete(key())
    assert await kit.store.size(key()) is None
    assert kit.leftovers() == []


@pytest.mark.parametrize(
    "bad",
    ["", "/abs", "../escape", "42/../../x", "42//x", "42/", "42/./x", ".hidden", "42/x#1", "a\\b", "a b"],
)
async def test_bad_keys_are_refused_before_anything_is_written(kit: Kit, bad: str) -> None:
    with pytest.raises(ValueError):
        await kit.store.put(bad, chunks_of(b"x"))
    for call in (kit.store.size(bad), kit.store.open(bad), kit.store.delete(bad)):
        with pytest.raises(ValueError):
            await call
    assert kit.leftovers() == []
    if kit.root is not None:
        assert sorted(p.name for p in kit.root.parent.iterdir()) == ["media"]  # nothing beside it


def _open_files(root: Path) -> list[str]:
    names = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(root)):
                names.append(target)
    return names


def _connections_to(port: int) -> int:
    return sum(
        1
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


async def test_a_reader_that_stops_early_releases_the_file_or_connection(kit: Kit) -> None:
    name = key()
    data = os.urandom(16 * MIB)
    await kit.store.put(name, chunks_of(data, MIB))
    # The web server keeps each response (and so each StoredObject) until it is done; a client
    # that went away must not keep the file open, or the connection busy, until then.
    abandoned = []
    for _ in range(8):
        opened = await kit.store.open(name)
        reader = opened.chunks()
        first = await anext(reader)
        assert first == data[: len(first)]
        await opened.aclose()
        abandoned.append((opened, reader))
        assert opened.closed
        with pytest.raises(StopAsyncIteration):
            await anext(reader)
        with pytest.raises(RuntimeError):
            opened.chunks()

    async def released() -> bool:
        if kit.root is not None:
            return _open_files(kit.root) == []
        assert kit.server is not None
        return _connections_to(kit.server.port) <= 2  # the pool's idle ones; 8 if the streams lived

    # Immediate for a file; a socket is closed by obstore's runtime, a moment later at most.
    await wait_until(released, timeout_s=3, interval_s=0.02, what="the abandoned reads released")
    async with await kit.store.open(name, start=MIB) as opened:
        assert await anext(opened.chunks()) == data[MIB : MIB + CHUNK_BYTES]
    assert opened.closed
    assert await kit.store.size(name) == len(data)


async def test_ping_and_kind(kit: Kit) -> None:
    await kit.store.ping()
    assert kit.store.kind == ("local" if kit.root is not None else "s3")
    await kit.store.close()
    with pytest.raises(RuntimeError):
        await kit.store.size(key())


async def test_an_unreachable_or_misconfigured_store_is_unavailable_not_absent(
    s3_server: S3Server, tmp_path: Path
) -> None:
    gone = tmp_path / "gone"
    local = MediaStore.from_url(gone.as_uri())
    gone.rmdir()
    with pytest.raises(StoreUnavailable):
        await local.ping()

    no_bucket = s3_store(s3_server, "s3://no-such-bucket/pre")
    with pytest.raises(StoreUnavailable):
        await no_bucket.ping()

    with socket_closed() as port:
        nobody = MediaStore.from_url(
            "s3://media", endpoint=f"http://127.0.0.1:{port}", access_key_id="k", secret_access_key="s"
        )
        with pytest.raises(StoreUnavailable):
            await nobody.ping()
        for call in (nobody.size("1/x"), nobody.open("1/x"), nobody.delete("1/x")):
            with pytest.raises(StoreUnavailable):
                await call
        with pytest.raises(StoreUnavailable):
            await nobody.put("1/x", chunks_of(b"x" * 1000))
        with pytest.raises(StoreUnavailable):
            await nobody.put("1/x", chunks_of(os.urandom(PART_BYTES + 1)))


@contextlib.contextmanager
def socket_closed() -> Iterator[int]:
    """A port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    yield port


async def test_from_settings_builds_either_store(s3_server: S3Server, tmp_path: Path) -> None:
    local = MediaStore.from_settings(Settings(_env_file=None, data_dir=tmp_path / "data"))  # type: ignore[call-arg]
    assert local.kind == "local" and (tmp_path / "data" / "media").is_dir()  # made if missing
    await local.ping()

    s3_server.create_bucket("from-settings")
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        media_store_url="s3://from-settings/media",
        media_s3_endpoint=s3_server.endpoint,
        media_s3_region=s3_server.region,
        media_s3_access_key_id=s3_server.access_key_id,
        media_s3_secret_access_key=SecretStr(s3_server.secret_access_key),
    )
    remote = MediaStore.from_settings(settings)
    assert remote.kind == "s3"
    await remote.ping()
    assert await remote.put("7/x", chunks_of(b"abc")) == 3
    assert await remote.size("7/x") == 3
