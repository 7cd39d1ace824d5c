"""The ingest baseline: a bare FastAPI endpoint on the same server stack that only reads the
body and answers 200, served with ingest's uvicorn settings (uvloop, httptools, no access log)."""

from __future__ import annotations

import argparse

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response

ACCEPTED = b'{"status":"accepted"}'


def create_app() -> FastAPI:
    app = FastAPI(title="bare", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/webhooks/meta/{slug}")
    async def receive(slug: str, request: Request) -> Response:
        await request.body()
        return Response(ACCEPTED, media_type="application/json")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(
        create_app(),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
    )


if __name__ == "__main__":
    main()
