"""The error body every Cortexx HTTP answer carries when it refuses: `{"error": code, "detail": text}`.

One shape for ingest, the read API and the HTTP server's own answers (draining, slow clients), so
a client handles them alike; extra fields (a 422's `fields`) come after the two.
"""

from __future__ import annotations

import orjson


def error_body(code: str, detail: str, **extra: object) -> bytes:
    return orjson.dumps({"error": code, "detail": detail, **extra})
