"""A simulator of Meta's Graph API, the media part, with faults switched at run time and a ledger
of what was fetched.

What the real API does, and this simulator with it:
- `GET /{version}/{media_id}` with `Authorization: Bearer <token>` (or `?access_token=`) answers
  `{"messaging_product": "whatsapp", "url", "mime_type", "sha256", "file_size", "id"}`: `sha256`
  in hex (webhooks carry the same hash in base64), `url` a download URL on Meta's media host
  that lives about 5 minutes (`url_ttl_s`);
- the download needs the same bearer token; an expired or altered URL is a 404;
- errors are Graph error objects, `{"error": {"message", "type", "code", "error_subcode"?,
  "fbtrace_id"}}`: an unknown (or deleted) media id is 400 code 100 subcode 33
  (`GraphMethodException`); a bad token 401 code 190 (`OAuthException`), an expired one code 190
  subcode 463; a transient failure 500 code 2 ("Service temporarily unavailable") or code 1;
- Messenger and Instagram attachments come with a CDN URL of their own, no token, that expires
  (`oe`, its expiry in hex seconds): expired, 403 "URL signature expired".

Content is generated from the media id (and size): any file is the same bytes every time, made
64 KiB at a time, so a 100 MB video is never built whole, and `media_digest` gives its hash
without a simulator (the sample webhooks use it). Registered media (`POST /_sim/media`) have the
type, size and name given; with `auto`, any numeric id (and any `/cdn/` name) is a file too, of a
size derived from the id (`auto_size`), which is how `cortexx up` serves the sample stream.

Faults (`PUT /_sim/faults`): `error_rate` answering `error_status` with Meta's error body,
`latency_ms`, `hang` (calls wait until it is cleared), `down` (connections reset),
`expired_urls` (every download URL answers as expired), `wrong_hash` (a share of downloads
served with a corrupted byte), `bytes_per_s` (a slow drip), each for `lookups`, `downloads` or
both (`applies_to`). The ledger (`GET /_sim/ledger`) counts lookups and downloads per media id
with their outcomes and bytes served.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import random
import secrets
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NoReturn

import orjson
from aiohttp import web

from infra.runtime.logging import get_logger

log = get_logger("graph_sim")

CHUNK = 64 * 1024
SHUTDOWN_TIMEOUT_S = 1.0
AUTO_MIN, AUTO_MAX = 4 * 1024, 96 * 1024


def media_chunks(media_id: str, size: int) -> Iterator[bytes]:
    """The bytes of a simulated file, 64 KiB at a time: the same for the same id and size."""
    key = hashlib.sha256(f"cortexx-graph-sim:{media_id}".encode()).digest()
    for index in range((size + CHUNK - 1) // CHUNK):
        block = hashlib.shake_256(key + index.to_bytes(8, "big")).digest(min(CHUNK, size - index * CHUNK))
        yield block


def media_digest(media_id: str, size: int) -> bytes:
    digest = hashlib.sha256()
    for chunk in media_chunks(media_id, size):
        digest.update(chunk)
    return digest.digest()


def auto_size(media_id: str) -> int:
    """The size of an unregistered file served in `auto` mode: 4 to 96 KiB, by its id."""
    seed = int.from_bytes(hashlib.sha256(media_id.encode()).digest()[:4], "big")
    return AUTO_MIN + seed % (AUTO_MAX - AUTO_MIN)


def auto_sha256_b64(media_id: str) -> str:
    """The webhook's `sha256` of an `auto` file."""
    return base64.b64encode(media_digest(media_id, auto_size(media_id))).decode()


def graph_error(message: str, kind: str, code: int, subcode: int | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"message": message, "type": kind, "code": code}
    if subcode is not None:
        error["error_subcode"] = subcode
    error["fbtrace_id"] = "A" + secrets.token_urlsafe(16)
    return {"error": error}


@dataclass
class Media:
    id: str
    mime_type: str
    size: int
    sha256: str  # hex
    file_name: str | None = None
    kind: Literal["whatsapp", "cdn"] = "whatsapp"
    gone: bool = False

    def view(self, base_url: str) -> dict[str, Any]:
        out = {**asdict(self), "file_size": self.size}
        out["sha256_b64"] = base64.b64encode(bytes.fromhex(self.sha256)).decode()
        if self.kind == "cdn":
            out["url"] = f"{base_url}/cdn/{self.id}?oe={int(time.time()) + 7 * 86400:x}"
        return out


@dataclass
class Faults:
    error_rate: float = 0.0
    error_status: int = 500
    latency_ms: float = 0.0
    hang: bool = False
    down: bool = False
    expired_urls: bool = False
    wrong_hash: float = 0.0
    bytes_per_s: float = 0.0
    applies_to: Literal["both", "lookups", "downloads"] = "both"

    def on(self, what: Literal["lookups", "downloads"]) -> bool:
        return self.applies_to in ("both", what)


@dataclass
class Fetched:
    lookups: int = 0
    downloads: int = 0  # downloads served whole and right
    bytes: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)


class GraphSimulator:
    def __init__(
        self,
        *,
        tokens: Iterable[str] = (),
        any_token: bool = False,
        auto: bool = False,
        url_ttl_s: float = 300.0,
        expired_tokens: Iterable[str] = (),
        seed: int | None = None,
    ) -> None:
        self.tokens = {t for t in tokens if t}
        self.any_token = any_token
        self.expired_tokens = set(expired_tokens)
        self.auto = auto
        self.url_ttl_s = url_ttl_s
        self.media: dict[str, Media] = {}
        self.faults = Faults()
        self.fetched: dict[str, Fetched] = {}
        self.random = random.Random(seed)
        self._secret = secrets.token_bytes(16)
        self._changed = asyncio.Event()
        self._stopping = False
        self.runner: web.AppRunner | None = None
        self.site: web.TCPSite | None = None
        self.base_url = ""

    # -------------------------------------------------------------------- the media contract

    def _json(self, status: int, body: dict[str, Any]) -> web.Response:
        return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")

    def _ledger(self, media_id: str) -> Fetched:
        return self.fetched.setdefault(media_id, Fetched())

    def _token(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            return header.removeprefix("Bearer ").strip() or None
        return request.query.get("access_token") or None

    def _refused(self, token: str | None) -> web.Response | None:
        if token is not None and token in self.expired_tokens:
            return self._json(
                401,
                graph_error(
                    "Error validating access token: Session has expired on Tuesday, 01-Dec-26 "
                    "10:00:00 PST. The current time is Wednesday, 02-Dec-26 10:00:00 PST.",
                    "OAuthException",
                    190,
                    463,
                ),
            )
        if token is None or (not self.any_token and token not in self.tokens):
            return self._json(
                401,
                graph_error("Invalid OAuth access token - Cannot parse access token", "OAuthException", 190),
            )
        return None

    def _find(self, media_id: str, kind: Literal["whatsapp", "cdn"]) -> Media | None:
        found = self.media.get(media_id)
        if found is None and self.auto and (kind == "cdn" or media_id.isdigit()):
            size = auto_size(media_id)
            found = Media(
                media_id, "application/octet-stream", size, media_digest(media_id, size).hex(), kind=kind
            )
            self.media[media_id] = found
        return found if found is not None and not found.gone else None

    def _drop(self, request: web.Request) -> NoReturn:
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionResetError("down")

    async def _faulted(
        self, request: web.Request, what: Literal["lookups", "downloads"]
    ) -> web.Response | None:
        """The faults switched on for `what`: a reset, a wait, an error answer, or None."""
        faults = self.faults
        if not faults.on(what):
            return None
        if faults.down:
            self._drop(request)
        if faults.latency_ms:
            await asyncio.sleep(faults.latency_ms / 1000)
        while self.faults.hang and self.faults.on(what) and not self._stopping:
            changed = self._changed
            await changed.wait()
        if faults.error_rate and self.random.random() < faults.error_rate:
            status = faults.error_status
            if status == 429:
                body = graph_error("(#4) Application request limit reached", "OAuthException", 4)
            elif status >= 500:
                body = graph_error(
                    "An unexpected error has occurred. Please retry your request later.", "OAuthException", 2
                )
            else:
                body = graph_error("An unknown error occurred", "OAuthException", 1)
            return self._json(status, body)
        return None

    def _signature(self, media_id: str, expires: int) -> str:
        return hmac.new(self._secret, f"{media_id}:{expires}".encode(), "sha256").hexdigest()[:32]

    async def lookup(self, request: web.Request) -> web.StreamResponse:
        media_id = request.match_info["media_id"]
        refused = self._refused(self._token(request))
        if refused is not None:
            self._ledger(media_id).outcomes["lookup_refused"] += 1
            return refused
        faulted = await self._faulted(request, "lookups")
        if faulted is not None:
            self._ledger(media_id).outcomes[f"lookup_{faulted.status}"] += 1
            return faulted
        media = self._find(media_id, "whatsapp")
        ledger = self._ledger(media_id)
        ledger.lookups += 1
        if media is None:
            ledger.outcomes["lookup_not_found"] += 1
            return self._json(
                400,
                graph_error(
                    f"Unsupported get request. Object with ID '{media_id}' does not exist, cannot be "
                    "loaded due to missing permissions, or does not support this operation. Please "
                    "read the Graph API documentation at https://developers.facebook.com/docs/graph-api",
                    "GraphMethodException",
                    100,
                    33,
                ),
            )
        expires = int(time.time() + self.url_ttl_s)
        url = f"{self.base_url}/lookaside/{media_id}?ext={expires}&hash={self._signature(media_id, expires)}"
        ledger.outcomes["lookup_ok"] += 1
        return self._json(
            200,
            {
                "messaging_product": "whatsapp",
                "url": url,
                "mime_type": media.mime_type,
                "sha256": media.sha256,
                "file_size": media.size,
                "id": media_id,
            },
        )

    async def download(self, request: web.Request) -> web.StreamResponse:
        media_id = request.match_info["media_id"]
        ledger = self._ledger(media_id)
        refused = self._refused(self._token(request))
        if refused is not None:
            ledger.outcomes["download_refused"] += 1
            return refused
        faulted = await self._faulted(request, "downloads")
        if faulted is not None:
            ledger.outcomes[f"download_{faulted.status}"] += 1
            return faulted
        try:
            expires = int(request.query.get("ext", ""))
        except ValueError:
            expires = 0
        valid = hmac.compare_digest(request.query.get("hash", ""), self._signature(media_id, expires))
        if not valid or expires < time.time() or self.faults.expired_urls:
            ledger.outcomes["download_expired"] += 1
            return web.Response(status=404, text="URL signature expired")
        media = self._find(media_id, "whatsapp")
        if media is None:
            ledger.outcomes["download_not_found"] += 1
            return web.Response(status=404, text="Not Found")
        return await self._serve(request, media, ledger)

    async def cdn(self, request: web.Request) -> web.StreamResponse:
        """A Messenger / Instagram attachment URL: no token; expires at `oe`."""
        name = request.match_info["name"]
        ledger = self._ledger(name)
        faulted = await self._faulted(request, "downloads")
        if faulted is not None:
            ledger.outcomes[f"download_{faulted.status}"] += 1
            return faulted
        try:
            expires = int(request.query.get("oe", "0"), 16)
        except ValueError:
            expires = 0
        if expires < time.time() or self.faults.expired_urls:
            ledger.outcomes["download_expired"] += 1
            return web.Response(status=403, text="URL signature expired")
        media = self._find(name, "cdn")
        if media is None:
            ledger.outcomes["download_not_found"] += 1
            return web.Response(status=404, text="Not Found")
        return await self._serve(request, media, ledger)

    async def _serve(self, request: web.Request, media: Media, ledger: Fetched) -> web.StreamResponse:
        corrupt = self.faults.on("downloads") and self.random.random() < self.faults.wrong_hash
        response = web.StreamResponse(
            status=200, headers={"Content-Type": media.mime_type, "Content-Length": str(media.size)}
        )
        await response.prepare(request)
        drip = self.faults.bytes_per_s if self.faults.on("downloads") else 0.0
        sent = 0
        for index, chunk in enumerate(media_chunks(media.id, media.size)):
            if corrupt and index == 0:
                chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
            await response.write(chunk)
            sent += len(chunk)
            if drip:
                await asyncio.sleep(len(chunk) / drip)
        await response.write_eof()
        ledger.bytes += sent
        if corrupt:
            ledger.outcomes["download_corrupted"] += 1
        else:
            ledger.downloads += 1
            ledger.outcomes["download_ok"] += 1
        return response

    # ------------------------------------------------------------------------ control API

    def register(
        self,
        *,
        media_id: str | None = None,
        mime_type: str = "image/jpeg",
        size: int = 50_000,
        file_name: str | None = None,
        kind: Literal["whatsapp", "cdn"] = "whatsapp",
        gone: bool = False,
    ) -> Media:
        media_id = media_id or (
            str(secrets.randbelow(9 * 10**15) + 10**15) if kind == "whatsapp" else secrets.token_hex(12)
        )
        media = Media(media_id, mime_type, size, media_digest(media_id, size).hex(), file_name, kind, gone)
        self.media[media_id] = media
        return media

    async def post_media(self, request: web.Request) -> web.Response:
        try:
            doc = orjson.loads(await request.read())
            many = isinstance(doc, list)
            specs = doc if many else [doc]
            made = [
                self.register(
                    media_id=spec.get("id"),
                    mime_type=str(spec.get("mime_type", "image/jpeg")),
                    size=int(spec.get("size", 50_000)),
                    file_name=spec.get("file_name"),
                    kind=spec.get("kind", "whatsapp"),
                    gone=bool(spec.get("gone", False)),
                ).view(self.base_url)
                for spec in specs
            ]
        except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError) as exc:
            return self._json(400, {"error": "bad_media", "detail": str(exc)})
        return self._json(200, {"items": made} if many else made[0])

    async def get_faults(self, _: web.Request) -> web.Response:
        return self._json(200, asdict(self.faults))

    async def put_faults(self, request: web.Request) -> web.Response:
        try:
            self.faults = Faults(**orjson.loads(await request.read()))
        except (orjson.JSONDecodeError, TypeError) as exc:
            return self._json(400, {"error": "bad_faults", "detail": str(exc)})
        log.info("graph_sim.faults", **asdict(self.faults))
        self._changed.set()
        self._changed = asyncio.Event()
        return self._json(200, asdict(self.faults))

    def ledger_view(self) -> dict[str, Any]:
        media = {
            k: {
                "lookups": v.lookups,
                "downloads": v.downloads,
                "bytes": v.bytes,
                "outcomes": dict(v.outcomes),
            }
            for k, v in self.fetched.items()
        }
        return {
            "lookups": sum(v.lookups for v in self.fetched.values()),
            "downloads": sum(v.downloads for v in self.fetched.values()),
            "bytes": sum(v.bytes for v in self.fetched.values()),
            "media": media,
        }

    async def ledger(self, _: web.Request) -> web.Response:
        return self._json(200, self.ledger_view())

    async def reset(self, request: web.Request) -> web.Response:
        """Faults and ledger cleared; registered media kept unless `?media=clear`."""
        self.faults = Faults()
        self.fetched.clear()
        if request.query.get("media") == "clear":
            self.media.clear()
        self._changed.set()
        self._changed = asyncio.Event()
        return self._json(200, {"status": "reset"})

    async def health(self, _: web.Request) -> web.Response:
        return self._json(200, {"status": "ok"})

    async def _on_shutdown(self, _: web.Application) -> None:
        self._stopping = True
        self._changed.set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_post("/_sim/media", self.post_media)
        app.router.add_get("/_sim/faults", self.get_faults)
        app.router.add_put("/_sim/faults", self.put_faults)
        app.router.add_get("/_sim/ledger", self.ledger)
        app.router.add_post("/_sim/reset", self.reset)
        app.router.add_get("/lookaside/{media_id}", self.download)
        app.router.add_get("/cdn/{name}", self.cdn)
        app.router.add_get("/{version:v[0-9]+\\.[0-9]+}/{media_id}", self.lookup)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def start(self, host: str, port: int) -> None:
        self.runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )
        await self.runner.setup()
        self.site = web.TCPSite(self.runner, host, port, reuse_address=True)
        await self.site.start()
        addresses = self.runner.addresses
        bound = int(addresses[0][1]) if addresses else port
        self.base_url = f"http://{host}:{bound}"
        log.info(
            "graph_sim.started",
            url=self.base_url,
            users=len(self.tokens),
            any_token=self.any_token,
            auto=self.auto,
        )

    async def stop(self) -> None:
        self._stopping = True
        self._changed.set()
        if self.runner is not None:
            await self.runner.cleanup()


async def serve(
    host: str,
    port: int,
    tokens: Iterable[str] = (),
    *,
    any_token: bool = False,
    auto: bool = False,
    url_ttl_s: float = 300.0,
    stop: asyncio.Event | None = None,
) -> None:
    """Run the simulator until `stop` is set (or the task is cancelled)."""
    sim = GraphSimulator(tokens=tokens, any_token=any_token, auto=auto, url_ttl_s=url_ttl_s)
    await sim.start(host, port)
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        await sim.stop()
