"""An S3-compatible server for the tests and the benchmarks, with no Docker: moto's standalone
server (`python -m moto.server`), run as our child process on a free port, so that its CPU is its
own and not the test's or the benchmark's, with the lifecycle of harness/embedded.py's services
(start, stop, and pause/resume for outage tests).

It keeps buckets in memory (large objects spill to temporary files) and forgets them when it
stops. moto checks no signature: any credentials pass, and these fixed ones are what the tests
give the store, so that a store configured for it looks like one configured for AWS.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from harness.embedded import EmbeddedServiceError, _ChildService, free_port, wait_for_port
from infra.runtime.logging import get_logger

log = get_logger(__name__)

ACCESS_KEY_ID = "cortexx-test-key"
SECRET_ACCESS_KEY = "cortexx-test-secret"
REGION = "us-east-1"


class S3Server(_ChildService):
    """moto's S3 on 127.0.0.1:`port` (a free one unless given); its log in `data_dir/s3.log`."""

    name = "s3"
    access_key_id = ACCESS_KEY_ID
    secret_access_key = SECRET_ACCESS_KEY
    region = REGION

    def __init__(self, data_dir: Path | None = None, port: int | None = None) -> None:
        super().__init__()
        self.data_dir = data_dir.resolve() if data_dir is not None else None
        self._fixed_port = port
        self.port = port or free_port()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> None:
        # A free port can be taken between our probe and the child's bind: try another then.
        attempts = 1 if self._fixed_port else 3
        for attempt in range(1, attempts + 1):
            try:
                self._start_once(timeout_s)
                return
            except EmbeddedServiceError:
                self.stop()
                if attempt == attempts:
                    raise
                self.port = free_port()

    def _start_once(self, timeout_s: float) -> None:
        started = time.monotonic()
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            out: IO[bytes] | int = self._open_log(self.data_dir / "s3.log")
        else:
            out = subprocess.DEVNULL
        env = {
            **os.environ,
            # Ours, whatever the environment says: moto reads these for its own clients.
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        wait_for_port("127.0.0.1", self.port, timeout_s, self.proc)
        log.info(
            "s3.started",
            port=self.port,
            pid=self.proc.pid,
            seconds=round(time.monotonic() - started, 2),
        )

    def _request(self, method: str, path: str) -> int:
        request = urllib.request.Request(f"{self.endpoint}{path}", method=method, data=b"")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise EmbeddedServiceError(f"s3 server: {method} {path} answered {exc.code}: {detail}") from exc

    def create_bucket(self, name: str) -> None:
        """Make bucket `name` (one path-style PUT; moto needs no signature)."""
        self._request("PUT", f"/{name}")

    def reset(self) -> None:
        """Forget every bucket and object (moto's own reset endpoint)."""
        self._request("POST", "/moto-api/reset")

    def incomplete_uploads(self, bucket: str) -> int:
        """How many multipart uploads `bucket` holds begun and neither completed nor aborted."""
        with urllib.request.urlopen(f"{self.endpoint}/{bucket}?uploads", timeout=10) as response:
            return int(response.read().count(b"<Upload>"))

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
