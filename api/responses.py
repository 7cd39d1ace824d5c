"""JSON answers written with orjson straight from database rows, for the hot read routes.

Building a pydantic model per row and then validating it again to serialize it cost more than
the query (about 1 ms for a page of 20 conversations). The routes that use this keep their
model as `response_model`, so the OpenAPI schema is unchanged, and `tests/api/test_bodies.py`
checks that the bytes are the ones the models would have written.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Response

# pydantic writes an aware UTC datetime as `...Z`; orjson does too with this option.
_OPTIONS = orjson.OPT_UTC_Z


def json_response(content: Any, headers_from: Response) -> Response:
    """`content` as JSON, with the headers that dependencies set on the request's response (the
    rolling session cookie): FastAPI copies those only into answers that it builds itself."""
    response = Response(orjson.dumps(content, option=_OPTIONS), media_type="application/json")
    for name, value in headers_from.raw_headers:
        if name not in (b"content-length", b"content-type"):
            response.raw_headers.append((name, value))
    return response
