"""Schemathesis over the read API's OpenAPI schema, logged in as a real user: whatever the
generated request, never a 5xx, and every error is a JSON body with a code and a detail."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings

from infra.postgres.db import connect
from tests.api.world import COOKIE, PASSWORD, new_company, session_cookie
from tests.faults.report import record
from tests.support import CortexxProcess, ServiceUrls

EXAMPLES_PER_OPERATION = 150


def _cookie(api: CortexxProcess, services: ServiceUrls) -> str:
    async def seed() -> str:
        conn = await connect(services.database_url)
        try:
            company = await new_company(conn)
        finally:
            await conn.close()
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.post(
                f"{api.url}/api/v1/sessions", json={"email": company.agent.email, "password": PASSWORD}
            )
        assert response.status_code == 201, response.text
        return session_cookie(response)

    return asyncio.run(seed())


def test_read_api_fuzz_never_answers_5xx(api: CortexxProcess, services: ServiceUrls) -> None:
    cookie = _cookie(api, services)
    me = httpx.get(f"{api.url}/api/v1/sessions/me", headers={"Cookie": f"{COOKIE}={cookie}"})
    assert me.status_code == 200, me.text
    # Logging out would end the session the other cases use; it has its own tests.
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json").exclude(method="DELETE")
    statuses: Counter[int] = Counter()
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: schemathesis.Case) -> None:
            # The generated case may carry a made-up session cookie; this one is real.
            case.cookies = {}
            # Any login attempt closes the session it comes with (no fixation): log in bare.
            logging_in = case.method == "POST" and case.path == "/api/v1/sessions"
            headers = {} if logging_in else {"Cookie": f"{COOKIE}={cookie}"}
            response = case.call(base_url=api.url, headers=headers)
            statuses[response.status_code] += 1
            assert response.status_code < 500, (case.method, case.path, response.status_code, response.text)
            if response.status_code >= 400:
                body = response.json()
                assert isinstance(body.get("error"), str) and body.get("detail"), body

        check()
    assert api.proc is not None and api.proc.poll() is None, "the API must survive the fuzz"
    record(
        "read API fuzz (schemathesis)",
        operations=operations,
        cases=sum(statuses.values()),
        server_errors=0,
        statuses=dict(statuses),
    )
