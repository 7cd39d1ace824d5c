"""Login limits: failed attempts per account and per client address are counted in Postgres (so
every replica sees them) and refused with 429 and Retry-After before any password is checked; a
success resets the account; and however many logins arrive, the password checks leave the rest
of the API fast (a bounded pool, and 503 at once past its queue).

Two API replicas with a small window and small limits; each test guesses from addresses of its
own (X-Forwarded-For, which the API believes from loopback), so tests never share a count.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Iterator
from typing import Any

import asyncpg
import httpx
import pytest

from tests.api.world import PASSWORD, Member, World, auth, session_cookie
from tests.support import CortexxProcess, ServiceUrls, wait_until

# Longer than the few failed checks a test makes (each ~0.1-0.5 s, seconds on a loaded 2-core
# machine: at 5 s a window could end mid-test there and the limit with it).
WINDOW_S = 15.0
ACCOUNT_MAX = 3
ADDRESS_MAX = 6
HASH_THREADS = 1
HASH_QUEUE_MAX = 4
LIMITS: dict[str, Any] = {
    "api_login_window_s": WINDOW_S,
    "api_login_account_failures_max": ACCOUNT_MAX,
    "api_login_address_failures_max": ADDRESS_MAX,
    "api_login_hash_threads": HASH_THREADS,
    "api_login_hash_queue_max": HASH_QUEUE_MAX,
    "session_prune_interval_s": 0.5,
}
WRONG = "not the password"


@pytest.fixture(scope="module")
def replicas(services: ServiceUrls) -> Iterator[tuple[CortexxProcess, CortexxProcess]]:
    """Two API processes on the same database, as behind a load balancer."""
    first, second = CortexxProcess.api(services, **LIMITS), CortexxProcess.api(services, **LIMITS)
    first.start()
    try:
        second.start()
        try:
            yield first, second
        finally:
            second.stop()
    finally:
        first.stop()


def new_address() -> str:
    return f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{secrets.randbelow(256)}"


def nobody() -> str:
    return f"nobody-{secrets.token_hex(4)}@nowhere.test"


async def attempt(
    client: httpx.AsyncClient, api: CortexxProcess, email: str, password: str, address: str
) -> httpx.Response:
    return await client.post(
        f"{api.url}/api/v1/sessions",
        json={"email": email, "password": password},
        headers={"X-Forwarded-For": address},
    )


def assert_throttled(response: httpx.Response, limit: str) -> int:
    assert response.status_code == 429, response.text
    body = response.json()
    assert body["error"] == "too_many_attempts"
    assert f"for this {limit}" in body["detail"]
    assert "set-cookie" not in response.headers
    retry_after = int(response.headers["retry-after"])
    assert 1 <= retry_after <= math.ceil(WINDOW_S)
    return retry_after


async def timed(call: Awaitable[httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    response = await call
    return response, time.perf_counter() - started


async def test_wrong_passwords_lock_the_account_until_the_window_ends(
    client: httpx.AsyncClient, replicas: tuple[CortexxProcess, CortexxProcess], world: World
):
    first, second = replicas
    agent, address = world.x.agent, new_address()
    failed = []
    for _ in range(ACCOUNT_MAX):
        response, took = await timed(attempt(client, first, agent.email, WRONG, address))
        assert response.status_code == 401, response.text
        failed.append(took)

    # Now even the right password is refused: on the other replica, from another address, and
    # with the email in other case and padding.
    locked = []
    for api, email, source in (
        (first, agent.email, address),
        (second, agent.email, address),
        (second, agent.email, new_address()),
        (first, f"  {agent.email.upper()} ", new_address()),
    ):
        response, took = await timed(attempt(client, api, email, PASSWORD, source))
        retry_after = assert_throttled(response, "account")
        locked.append(took)
    # Refused before the password is checked: a few statements, no argon2 (which takes 100+ ms
    # here). Were a check made before the refusal, this ratio would be one half or more.
    assert statistics.median(locked) < statistics.median(failed) / 4, (locked, failed)

    await asyncio.sleep(retry_after + 0.1)
    response = await attempt(client, second, agent.email, PASSWORD, address)
    assert response.status_code == 201, response.text


async def test_one_address_guessing_over_many_accounts_is_refused(
    client: httpx.AsyncClient, replicas: tuple[CortexxProcess, CortexxProcess], world: World
):
    first, second = replicas
    sprayer = new_address()
    # Unknown emails count like users' (a refusal must not tell which emails exist).
    targets = [world.x.agent.email, world.y.agent.email, *(nobody() for _ in range(ADDRESS_MAX - 2))]
    for i, email in enumerate(targets):
        response = await attempt(client, replicas[i % 2], email, WRONG, sprayer)
        assert response.status_code == 401, response.text
    # Past the limit, nothing from that address is checked, whichever account, whichever password.
    colleague = world.x.colleague
    for api in (first, second):
        assert_throttled(await attempt(client, api, colleague.email, PASSWORD, sprayer), "address")
        assert_throttled(await attempt(client, api, nobody(), WRONG, sprayer), "address")
    # Other clients are not refused, and the accounts sprayed once each are not locked.
    for member in (colleague, world.x.agent):
        response = await attempt(client, first, member.email, PASSWORD, new_address())
        assert response.status_code == 201, response.text


async def test_a_success_resets_the_account(
    client: httpx.AsyncClient, replicas: tuple[CortexxProcess, CortexxProcess], world: World
):
    first, second = replicas
    agent = world.x.agent
    for api in (first, second, first):
        # An address of its own each round: a success resets the account, not the address.
        address = new_address()
        for _ in range(ACCOUNT_MAX - 1):
            assert (await attempt(client, api, agent.email, WRONG, address)).status_code == 401
        response = await attempt(client, api, agent.email, PASSWORD, address)
        assert response.status_code == 201, response.text


async def test_concurrent_guesses_on_two_replicas_cannot_overshoot_the_limit(
    client: httpx.AsyncClient, replicas: tuple[CortexxProcess, CortexxProcess], world: World
):
    """A slot is taken before the password is checked: guesses in flight at once, on either
    replica, get exactly the limit's worth of checks."""
    agent = world.x.agent
    guesses = 2 * HASH_QUEUE_MAX  # within what both replicas' pools admit: no 503
    answers = await asyncio.gather(
        *(attempt(client, replicas[i % 2], agent.email, WRONG, new_address()) for i in range(guesses))
    )
    codes = Counter(response.status_code for response in answers)
    assert codes == {401: ACCOUNT_MAX, 429: guesses - ACCOUNT_MAX}, codes


async def test_attempts_whose_window_ended_are_pruned(
    client: httpx.AsyncClient,
    replicas: tuple[CortexxProcess, CortexxProcess],
    world: World,
    db: asyncpg.Connection,
):
    response = await attempt(client, replicas[0], world.x.agent.email, WRONG, new_address())
    assert response.status_code == 401
    # The table names neither the email nor the address: 32-byte HMACs only.
    assert await db.fetchval("SELECT bool_and(octet_length(key) = 32) FROM login_attempts")

    async def pruned() -> bool:
        stale = "SELECT count(*) FROM login_attempts WHERE window_ends < now() - interval '1 second'"
        return bool(await db.fetchval(stale) == 0)

    await asyncio.sleep(WINDOW_S)
    await wait_until(pruned, timeout_s=10, what="ended login windows pruned")
    assert "login_attempts.pruned" in replicas[0].log_path.read_text() + replicas[1].log_path.read_text()


async def _login(client: httpx.AsyncClient, api: CortexxProcess, member: Member) -> str:
    response = await attempt(client, api, member.email, PASSWORD, new_address())
    assert response.status_code == 201, response.text
    return session_cookie(response)


def _p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]


async def test_a_login_storm_leaves_the_rest_of_the_api_fast(
    client: httpx.AsyncClient, replicas: tuple[CortexxProcess, CortexxProcess], world: World
):
    """16 clients guessing at once, each guess from its own address at its own account (so no
    limit stops them: a botnet), while another user reads the status counts. The password checks
    run on one nicer thread behind a short queue, and the overflow is 503 at once."""
    api = replicas[0]
    cookie = await _login(client, api, world.y.agent)
    url = f"{api.url}/api/v1/conversations/counts"

    async def poll(n: int) -> list[float]:
        samples = []
        for _ in range(n):
            response, took = await timed(client.get(url, headers=auth(cookie)))
            assert response.status_code == 200, response.text
            samples.append(took)
            await asyncio.sleep(0.01)
        return samples

    baseline = await poll(50)
    stop = asyncio.Event()
    codes: Counter[int] = Counter()
    busy: list[httpx.Response] = []

    async def guesser() -> None:
        async with httpx.AsyncClient(timeout=30) as own:
            while not stop.is_set():
                response = await attempt(own, api, nobody(), WRONG, new_address())
                codes[response.status_code] += 1
                if response.status_code == 503:
                    busy.append(response)

    storm = [asyncio.create_task(guesser()) for _ in range(16)]
    try:
        await asyncio.sleep(0.5)  # the queue fills
        during = await poll(100)
    finally:
        stop.set()
        await asyncio.gather(*storm)
    base_p95, storm_p95 = _p95(baseline), _p95(during)
    print(f"counts p95: {base_p95 * 1000:.1f} ms before, {storm_p95 * 1000:.1f} ms in the storm; {codes}")
    # The machine has 2 cores, shared with Postgres, the test and other jobs: a generous bound.
    # (Before the fix, the checks ran unbounded while each login held a pooled connection: 1.7 s.)
    # Generous for a shared 2-core machine (CI saw 217 ms once beside other runs); unbounded
    # checks holding pooled connections measured 1,681 ms.
    assert storm_p95 < 0.3, (base_p95, storm_p95)
    assert codes[401] > 0, codes  # passwords were checked all along
    assert set(codes) <= {401, 503}, codes
    assert busy, "16 guessers at once must overflow one thread and a queue of 4"
    assert busy[0].json()["error"] == "login_busy"
    assert busy[0].headers["retry-after"] == "1"
