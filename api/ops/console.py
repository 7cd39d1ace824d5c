"""What the console keeps per API process: the metrics collector, the dead letters read so far
and the CSRF key."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

from api.ops.collector import OpsCollector
from api.readiness import BrokerSnapshot
from api.sessions import derive_key
from infra.kafka.replay import DeadLetterReader
from infra.runtime.compare import same_secret
from infra.runtime.settings import Settings


class OpsConsole:
    def __init__(self, settings: Settings, secret: bytes, snapshot: Callable[[], BrokerSnapshot]) -> None:
        self.collector = OpsCollector(settings, snapshot)
        self.dead_letters = DeadLetterReader(settings.kafka_bootstrap or "")
        self._csrf_key = derive_key(secret, "ops-csrf")

    def start(self) -> None:
        self.collector.start()

    async def stop(self) -> None:
        await self.collector.stop()

    def csrf_token(self, sid: str) -> str:
        """Bound to the session: worthless with another cookie, and gone at logout."""
        return hmac.new(self._csrf_key, sid.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, sid: str, token: str | None) -> bool:
        return bool(token) and same_secret(token, self.csrf_token(sid))
