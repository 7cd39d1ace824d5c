"""The media store: where inbound media and reply attachments are kept, behind one interface.

Two stores, one code path: the local disk (the embedded default, `data_dir/media`) and an
S3-compatible store (production: AWS S3, MinIO, R2, ...). Both go through obstore: Rust's
`object_store` crate (the one Arrow, DataFusion and Delta stand on), one well-kept async API over
the local disk and S3 alike, with streamed multipart uploads, streamed and ranged reads, retries
with backoff, and typed errors (not found apart from the rest). Nothing here knows what media
is: keys are opaque `<company_id>/<id>` paths, and callers keep sizes, hashes and types in
Postgres. It touches the store's directory or bucket (under its prefix) and nothing else.

What a caller can count on (tests/test_media_storage.py shows each, on both stores):

- An object appears whole or not at all, and replaces an earlier one only whole. A put whose
  chunks raise is aborted, the caller's exception propagates unchanged, and nothing is left
  under the key. On the disk obstore writes a staging file beside the key (`<key>#<n>`) and
  renames it over the key once complete, removing it on failure or cancellation; on S3 an
  object is one PUT, or a multipart upload completed after its last part and aborted otherwise.
- Memory per upload is bounded by the part size times the parts in flight, whatever the size.
- Reads stream in chunks of at most CHUNK_BYTES, from one version of the object (the disk
  store reads an open file, which a concurrent replace does not change).

Only a crash mid-upload leaves something behind: a `<key>#<n>` staging file on the disk, or on
S3 an incomplete multipart upload (unseen but billed: give the bucket a lifecycle rule that
aborts incomplete multipart uploads after a day).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import re
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Self
from urllib.parse import urlsplit
from urllib.request import url2pathname

import obstore as obs
from obstore.exceptions import BaseError as ObstoreError
from obstore.store import LocalStore, S3Store

from infra.runtime.logging import get_logger

if TYPE_CHECKING:
    from obstore import Attributes, BytesStream, GetOptions, GetResult
    from obstore.store import ClientConfig, RetryConfig, S3Config

    from infra.runtime.settings import Settings

log = get_logger(__name__)

KIB: Final = 1024
MIB: Final = 1024 * KIB

# The largest chunk a read yields: small enough that a response in flight holds little memory,
# large enough that a 100 MB video is 400 awaits, not 10,000.
CHUNK_BYTES: Final = 256 * KIB
# Multipart parts: S3 wants 5 MiB at least (but the last); 8 MiB x 10,000 parts is 80 GB, far over
# WhatsApp's 100 MB. An upload holds about PART_BYTES x (PART_CONCURRENCY + 1) in memory.
PART_BYTES: Final = 8 * MIB
PART_CONCURRENCY: Final = 2
# How long a cancelled put waits for obstore to abort its multipart upload before giving up on it.
ABORT_WAIT_S: Final = 10.0

# Keys are paths of plain parts: no "..", no "." part, no empty part, no leading "/", and no
# character a store would read otherwise (a "#" would look like a staging file to the disk store).
_KEY_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=-]*")
_KEY_MAX_BYTES: Final = 512  # S3 takes 1,024 with the prefix; ours are ~60

# obstore retries connection errors, 5xx and timeouts itself; a put or a get gives up within
# ~30 s, so that callers (with their own backoff, and a breaker) see the outage and back off.
_RETRY: RetryConfig = {
    "max_retries": 3,
    "retry_timeout": timedelta(seconds=30),
    "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2)},
}
_CLIENT: ClientConfig = {
    "connect_timeout": timedelta(seconds=5),
    # A stalled transfer (no byte for this long) is an error...
    "read_timeout": timedelta(seconds=30),
    # ...but a whole request may be long: a slow phone downloading a 100 MB video is one GET.
    # (object_store's default, 30 s, would cut such a download off in the middle.)
    "timeout": timedelta(minutes=30),
}
# /ready asks every few seconds and waits ~100 ms: one attempt, no retry, no long connect.
_PROBE_RETRY: RetryConfig = {"max_retries": 0}
_PROBE_CLIENT: ClientConfig = {
    "connect_timeout": timedelta(seconds=1),
    "timeout": timedelta(seconds=5),
}
# Listed by ping: no key can begin with ".", so this prefix never holds an object.
_PROBE_PREFIX: Final = ".cortexx-ping/"


class StoreError(Exception):
    """Base of the media store's errors."""


class MediaNotFound(StoreError):
    """No object under the key."""

    def __init__(self, key: str) -> None:
        super().__init__(f"no media object under {key!r}")
        self.key = key


class RangeNotSatisfiable(StoreError):
    """The range asked for starts at or past the object's end (HTTP 416; `size` is for its
    `Content-Range: bytes */<size>`)."""

    def __init__(self, key: str, size: int) -> None:
        super().__init__(f"range not satisfiable: {key!r} has {size} bytes")
        self.key = key
        self.size = size


class StoreUnavailable(StoreError):
    """The store did not do it, and retrying later may: it is unreachable, timed out, answered
    5xx, or refused us (credentials, permissions, a missing bucket or directory, a full disk:
    an operator's fix, after which the same call passes). Never about the key or its bytes."""


def checked_key(key: str) -> str:
    """`key` if it is a path of plain parts (see _KEY_PART), else ValueError."""
    if not key or len(key.encode()) > _KEY_MAX_BYTES:
        raise ValueError(f"media key must be 1 to {_KEY_MAX_BYTES} bytes: {key!r}")
    for part in key.split("/"):
        if not _KEY_PART.fullmatch(part):
            raise ValueError(
                f"bad media key {key!r}: parts are [A-Za-z0-9_][A-Za-z0-9._=-]*, "
                "no empty part, no '.' or '..', no leading '/'"
            )
    return key


@contextlib.contextmanager
def _translated(key: str) -> Iterator[None]:
    """obstore's errors as ours: not found apart, everything else the store's failure."""
    try:
        yield
    except FileNotFoundError as exc:  # obstore raises the builtin for a missing object
        raise MediaNotFound(key) from exc
    except (ObstoreError, OSError) as exc:
        raise StoreUnavailable(_first_line(exc)) from exc


def _first_line(exc: BaseException) -> str:
    # obstore's messages carry a multi-line "Debug source:" dump after the first line.
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


class _Stopped(Exception):
    """Raised to obstore from a cancelled put's chunks, so that it aborts the upload."""


class _Upload:
    """The caller's chunks as obstore pulls them for a multipart upload: counted, the caller's
    own error kept (to be raised unchanged), and stoppable from outside.

    obstore pulls each chunk in a task of its own. Cancelling our put alone would drop obstore's
    future with its parts already on S3 (unseen and billed); `stop()` instead makes the next (or
    the pending) pull raise, and obstore aborts the upload as it does for any failing source.
    """

    def __init__(self, head: list[bytes], rest: AsyncIterator[bytes]) -> None:
        self._head = collections.deque(head)
        self._rest = rest
        self.written = 0
        self.error: BaseException | None = None
        self._stopped = False
        self._puller: asyncio.Task[object] | None = None

    def __aiter__(self) -> _Upload:
        return self

    async def __anext__(self) -> bytes:
        if self._stopped:
            raise _Stopped
        chunk = self._head.popleft() if self._head else await self._pull()
        self.written += len(chunk)
        return chunk

    async def _pull(self) -> bytes:
        self._puller = asyncio.current_task()
        try:
            while True:
                chunk = await anext(self._rest)
                if chunk:
                    return bytes(chunk)  # no copy of bytes; a caller's reused buffer is copied
        except StopAsyncIteration:
            raise
        except BaseException as exc:
            if self._stopped and isinstance(exc, asyncio.CancelledError):
                raise _Stopped from None
            self.error = exc
            raise
        finally:
            self._puller = None

    def stop(self) -> None:
        self._stopped = True
        if self._puller is not None and not self._puller.done():
            self._puller.cancel()


class StoredObject:
    """One object opened for reading: its size, the range being read, and its bytes as a
    stream (`chunks()`, once). Close it (`aclose()`, or `async with`) when the reader goes
    away early, a client that disconnected: that closes the file or the connection at once."""

    def __init__(
        self,
        key: str,
        result: GetResult,
        *,
        size: int,
        start: int,
        end: int,
        content_type: str | None,
    ) -> None:
        self.key = key
        self.size = size  # the whole object's
        self.start = start
        self.end = end  # inclusive, as in HTTP's Content-Range; start - 1 when nothing is read
        self.content_type = content_type  # as given to put; None from the disk store
        self._result: GetResult | None = result
        self._stream: BytesStream | None = result.stream(min_chunk_size=CHUNK_BYTES)
        self._reader: AsyncGenerator[bytes, None] | None = None
        self.closed = False

    @property
    def length(self) -> int:
        """How many bytes `chunks()` yields."""
        return self.end - self.start + 1

    def chunks(self) -> AsyncIterator[bytes]:
        """The range's bytes, streamed, each chunk at most CHUNK_BYTES; StoreUnavailable if the
        store fails mid-way. Once per object."""
        if self._stream is None:
            raise RuntimeError(f"{self.key!r} was already read or closed")
        stream, self._stream = self._stream, None
        self._reader = self._read(stream)
        return self._reader

    async def _read(self, stream: BytesStream) -> AsyncGenerator[bytes, None]:
        try:
            while True:
                try:
                    piece = await anext(stream)
                except StopAsyncIteration:
                    return
                except (ObstoreError, OSError) as exc:
                    raise StoreUnavailable(_first_line(exc)) from exc
                if len(piece) <= CHUNK_BYTES:
                    yield piece
                    continue
                # obstore's chunks are at least, not at most, the size asked for (S3's run over
                # by up to an HTTP frame).
                view = memoryview(piece)
                for offset in range(0, len(piece), CHUNK_BYTES):
                    yield bytes(view[offset : offset + CHUNK_BYTES])
        finally:
            del stream  # the last reference: obstore closes the file or the connection
            self._result = None

    async def aclose(self) -> None:
        """Stop reading: the file or connection is released now, not when collected."""
        self.closed = True
        self._stream = None
        self._result = None
        reader, self._reader = self._reader, None
        if reader is not None:
            await reader.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class MediaStore:
    """The media store: `from_settings` or `from_url`, then put, open, size, delete, ping.

    No network in the constructor (obstore connects on first use); `close()` on shutdown.
    """

    def __init__(
        self,
        store: LocalStore | S3Store,
        *,
        kind: Literal["local", "s3"],
        location: str,
        probe: S3Store | None = None,
        root: Path | None = None,
        part_bytes: int = PART_BYTES,
        part_concurrency: int = PART_CONCURRENCY,
    ) -> None:
        if part_bytes < 5 * MIB:
            raise ValueError("part_bytes must be 5 MiB or more (S3's smallest part)")
        if part_concurrency < 1:
            raise ValueError("part_concurrency must be 1 or more")
        self._store: LocalStore | S3Store | None = store
        self._kind: Literal["local", "s3"] = kind
        self._location = location
        self._probe = probe
        self._root = root
        self._part_bytes = part_bytes
        self._part_concurrency = part_concurrency

    @classmethod
    def from_settings(cls, settings: Settings) -> MediaStore:
        """The store `settings.media_store` names (file:// or s3://bucket/prefix)."""
        secret = settings.media_s3_secret_access_key
        return cls.from_url(
            settings.media_store,
            endpoint=settings.media_s3_endpoint,
            region=settings.media_s3_region,
            access_key_id=settings.media_s3_access_key_id,
            secret_access_key=secret.get_secret_value() if secret is not None else None,
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        endpoint: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        part_bytes: int = PART_BYTES,
        part_concurrency: int = PART_CONCURRENCY,
    ) -> MediaStore:
        """A store from its URL: `file:///dir` (made if missing) or `s3://bucket[/prefix]`.

        S3: `endpoint` is an S3-compatible server's URL (None: AWS in `region`); credentials
        None: obstore's usual chain (AWS_* variables, web identity, the instance's role)."""
        parts = urlsplit(url)
        if parts.scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise ValueError(f"a file:// media store must be on this host: {url!r}")
            root = Path(url2pathname(parts.path))
            if not root.is_absolute():
                raise ValueError(f"a file:// media store needs an absolute path: {url!r}")
            root.mkdir(parents=True, exist_ok=True)
            return cls(
                LocalStore(root),
                kind="local",
                location=root.as_uri(),
                root=root,
                part_bytes=part_bytes,
                part_concurrency=part_concurrency,
            )
        if parts.scheme == "s3":
            bucket, prefix = parts.netloc, parts.path.strip("/") or None
            if not bucket:
                raise ValueError(f"an s3:// media store needs a bucket: {url!r}")
            if (access_key_id is None) != (secret_access_key is None):
                raise ValueError("give both the S3 access key id and the secret access key, or neither")

            config: S3Config = {
                "region": region,
                # Path-style (`endpoint/bucket/key`) is what S3-compatible servers answer; AWS
                # itself prefers virtual-hosted (`bucket.s3.region.amazonaws.com`).
                "virtual_hosted_style_request": endpoint is None,
            }
            if endpoint is not None:
                config["endpoint"] = endpoint
            if access_key_id is not None and secret_access_key is not None:
                config["access_key_id"] = access_key_id
                config["secret_access_key"] = secret_access_key
            allow_http = endpoint is not None and endpoint.startswith("http://")

            def s3(client: ClientConfig, retry: RetryConfig) -> S3Store:
                return S3Store(
                    bucket,
                    prefix=prefix,
                    config=config,
                    client_options={**client, "allow_http": allow_http},
                    retry_config=retry,
                )

            where = f"s3://{bucket}/{prefix or ''}" + (f" at {endpoint}" if endpoint else "")
            return cls(
                s3(_CLIENT, _RETRY),
                kind="s3",
                location=where,
                probe=s3(_PROBE_CLIENT, _PROBE_RETRY),
                part_bytes=part_bytes,
                part_concurrency=part_concurrency,
            )
        raise ValueError(f"a media store URL is file:// or s3://, not {url!r}")

    @property
    def kind(self) -> str:
        """Either "local" or "s3", for logs and /ready."""
        return self._kind

    @property
    def location(self) -> str:
        """Where the objects are (no credentials), for logs."""
        return self._location

    def __repr__(self) -> str:
        return f"MediaStore({self._kind}, {self._location})"

    @property
    def _client(self) -> LocalStore | S3Store:
        if self._store is None:
            raise RuntimeError("the media store is closed")
        return self._store

    def _attributes(self, content_type: str | None) -> Attributes | None:
        # The disk store keeps no attributes (obstore refuses them there); S3 serves it back.
        return {"Content-Type": content_type} if content_type and self._kind == "s3" else None

    async def put(self, key: str, chunks: AsyncIterable[bytes], *, content_type: str | None = None) -> int:
        """Store `chunks` under `key`, streamed; returns the bytes written.

        Whole or nothing: if `chunks` raises, the upload is aborted, nothing is left under the
        key (an earlier object stays as it was) and the exception propagates unchanged.
        """
        path = checked_key(key)
        store = self._client
        source = aiter(chunks)
        head: list[bytes] = []
        buffered = 0
        # Up to one part is gathered first: most media are smaller, and one PUT is one request
        # where a multipart upload is three. The caller's errors here need no abort at all.
        async for chunk in source:
            if chunk:
                head.append(bytes(chunk))
                buffered += len(chunk)
                if buffered >= self._part_bytes:
                    break
        else:
            with _translated(key):
                await obs.put_async(
                    store, path, head, use_multipart=False, attributes=self._attributes(content_type)
                )
            return buffered
        upload = _Upload(head, source)
        pending = asyncio.ensure_future(
            obs.put_async(
                store,
                path,
                upload,
                use_multipart=True,
                chunk_size=self._part_bytes,
                max_concurrency=self._part_concurrency,
                attributes=self._attributes(content_type),
            )
        )
        try:
            await asyncio.shield(pending)
        except asyncio.CancelledError:
            await self._abort(key, upload, pending)
            raise
        except BaseException as exc:
            if exc is upload.error:
                raise  # the caller's own, unchanged
            with _translated(key):
                raise
        return upload.written

    async def _abort(self, key: str, upload: _Upload, pending: asyncio.Future[Any]) -> None:
        """Cancelled mid-upload: let obstore abort it (see _Upload), waiting ABORT_WAIT_S at most."""
        upload.stop()
        done, _ = await asyncio.wait({pending}, timeout=ABORT_WAIT_S)
        if not done:
            pending.cancel()
            log.warning("media_store.abort_unconfirmed", key=key, kind=self._kind, waited_s=ABORT_WAIT_S)
        elif not pending.cancelled():
            pending.exception()  # retrieved: it is the _Stopped we caused

    async def open(
        self,
        key: str,
        *,
        start: int | None = None,
        end: int | None = None,
        suffix: int | None = None,
    ) -> StoredObject:
        """The object under `key`, to stream: all of it, bytes `start`..`end` (inclusive, as
        in HTTP's Range; an end past the object is its end), or its last `suffix` bytes.

        MediaNotFound if absent; RangeNotSatisfiable if the range starts at or past its end
        (any range of an empty object); ValueError for a range that is not one (start > end).
        """
        path = checked_key(key)
        options: GetOptions = {}
        if suffix is not None:
            if start is not None or end is not None:
                raise ValueError("a range is start and end, or a suffix, not both")
            if suffix < 1:
                raise ValueError(f"a suffix range needs 1 byte or more, not {suffix}")
            options["range"] = {"suffix": suffix}
        elif start is not None or end is not None:
            first = start or 0
            if first < 0 or (end is not None and end < first):
                raise ValueError(f"not a byte range: {start}-{end}")
            options["range"] = (first, end + 1) if end is not None else {"offset": first}
        try:
            with _translated(key):
                result = await obs.get_async(self._client, path, options=options)
        except StoreUnavailable:
            if "range" not in options:
                raise
            # obstore says "invalid range" in words only (and S3 as a 416): ask for the size.
            size = await self.size(key)
            if size is None:
                raise MediaNotFound(key) from None
            if size == 0 or (start or 0) >= size:
                raise RangeNotSatisfiable(key, size) from None
            raise
        first, stop = result.range
        if "range" in options and stop <= first:
            # The disk store answers a suffix of an empty object with nothing; S3 with a 416.
            raise RangeNotSatisfiable(key, result.meta["size"])
        return StoredObject(
            key,
            result,
            size=result.meta["size"],
            start=first,
            end=stop - 1,
            content_type=result.attributes.get("Content-Type") if self._kind == "s3" else None,
        )

    async def size(self, key: str) -> int | None:
        """The object's size in bytes; None if there is none under `key`."""
        path = checked_key(key)
        try:
            with _translated(key):
                meta = await obs.head_async(self._client, path)
        except MediaNotFound:
            return None
        return meta["size"]

    async def delete(self, key: str) -> None:
        """Delete the object under `key`; none there is fine (S3 says so, the disk raises)."""
        path = checked_key(key)
        with contextlib.suppress(MediaNotFound), _translated(key):
            await obs.delete_async(self._client, path)

    async def ping(self) -> None:
        """A cheap check that the store answers, for /ready: StoreUnavailable if not.

        The disk: the directory is there and writable. S3: one LIST of a prefix no key can
        have, with no retry, which a wrong endpoint, wrong credentials or a missing bucket fail.
        """
        _ = self._client  # closed: RuntimeError (a bug), not an outage
        if self._root is not None:
            await asyncio.to_thread(_check_directory, self._root)
            return
        assert self._probe is not None
        with _translated(_PROBE_PREFIX):
            await obs.list_with_delimiter_async(self._probe, prefix=_PROBE_PREFIX)

    async def close(self) -> None:
        """Release the clients (obstore has no close: its connection pools go with them). An
        object opened before still reads to its end."""
        self._store = None
        self._probe = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def _check_directory(root: Path) -> None:
    if not root.is_dir():
        raise StoreUnavailable(f"media directory {root} is missing")
    if not os.access(root, os.W_OK | os.X_OK):
        raise StoreUnavailable(f"media directory {root} is not writable")
