"""Login, logout, who am I; every way a session can be missing or dead is a clear 401, never 500."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from datetime import datetime

import asyncpg
import httpx
import pytest

from api.sessions import stored_sid
from api.users import hash_password
from tests.api.world import COOKIE, PASSWORD, World, auth, login, session_cookie
from tests.support import CortexxProcess, ServiceUrls, wait_until

pytestmark = pytest.mark.usefixtures("api")


async def _sid_rows(db: asyncpg.Connection, user_id: int) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT sid, expire FROM user_sessions WHERE (sess->>'user_id')::bigint = $1 ORDER BY expire", user_id
    )


async def test_login_sets_a_safe_cookie_and_me_answers(
    client: httpx.AsyncClient, api: CortexxProcess, world: World
):
    agent = world.x.agent
    response = await client.post(
        f"{api.url}/api/v1/sessions", json={"email": agent.email.upper(), "password": PASSWORD}
    )
    assert response.status_code == 201, response.text
    assert response.json()["user"]["email"] == agent.email
    assert response.json()["user"]["company"]["slug"] == world.x.tenant.slug
    header = response.headers["set-cookie"]
    attributes = {part.strip().split("=")[0].lower() for part in header.split(";")}
    assert {"httponly", "secure", "path", "max-age"} <= attributes
    assert "samesite=lax" in header.lower()

    me = await client.get(f"{api.url}/api/v1/sessions/me", headers=auth(session_cookie(response)))
    assert me.status_code == 200
    body = me.json()
    assert body["user"]["id"] == agent.id
    assert body["user"]["company"]["id"] == world.x.id
    assert body["user"]["role"] == "agent"
    assert datetime.fromisoformat(body["expires_at"])


async def test_wrong_password_unknown_email_and_inactive_user_are_401(
    client: httpx.AsyncClient, api: CortexxProcess, world: World, db: asyncpg.Connection
):
    url = f"{api.url}/api/v1/sessions"
    for body in (
        {"email": world.x.agent.email, "password": "wrong password"},
        {"email": "nobody@nowhere.test", "password": PASSWORD},
    ):
        response = await client.post(url, json=body)
        assert response.status_code == 401
        assert response.json() == {"error": "invalid_credentials", "detail": "email or password is wrong"}
        assert "set-cookie" not in response.headers
    await db.execute("UPDATE users SET is_active = false WHERE id = $1", world.x.colleague.id)
    response = await client.post(url, json={"email": world.x.colleague.email, "password": PASSWORD})
    assert response.status_code == 401


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "not_authenticated"),
        ({"Cookie": f"{COOKIE}=garbage"}, "invalid_session"),
        ({"Cookie": f"{COOKIE}="}, "not_authenticated"),
        ({"Cookie": f"{COOKIE}=a.b.c"}, "invalid_session"),
        ({"Cookie": f"{COOKIE}={'x' * 4000}"}, "invalid_session"),
        ({"Cookie": "other=1"}, "not_authenticated"),
    ],
)
async def test_no_or_garbage_cookie_is_401(client: httpx.AsyncClient, api: CortexxProcess, headers, code):
    for path in ("/api/v1/sessions/me", "/api/v1/conversations", "/api/v1/notifications/unread-count"):
        response = await client.get(f"{api.url}{path}", headers=headers)
        assert response.status_code == 401, response.text
        assert response.json()["error"] == code
        assert response.json()["detail"]


async def test_tampered_cookie_is_401(client: httpx.AsyncClient, api: CortexxProcess, world: World):
    cookie = await login(client, api, world.x.agent)
    sid, _, mac = cookie.partition(".")
    flipped = chr(ord(sid[0]) ^ 1) + sid[1:]
    forged_mac = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
    for tampered in (f"{flipped}.{mac}", f"{sid}.{forged_mac}", sid, f"{sid}.", f".{mac}"):
        response = await client.get(f"{api.url}/api/v1/sessions/me", headers=auth(tampered))
        assert response.status_code == 401, tampered
        assert response.json()["error"] in ("invalid_session", "not_authenticated")
    # The genuine cookie still works.
    assert (await client.get(f"{api.url}/api/v1/sessions/me", headers=auth(cookie))).status_code == 200


async def test_expired_session_is_401(
    client: httpx.AsyncClient, api: CortexxProcess, world: World, db: asyncpg.Connection
):
    cookie = await login(client, api, world.x.agent)
    # The database clock decides: a row whose expire has passed is dead, whatever the cookie says.
    await db.execute(
        "UPDATE user_sessions SET expire = now() - interval '1 second' WHERE sid = $1",
        stored_sid(cookie.split(".")[0]),
    )
    response = await client.get(f"{api.url}/api/v1/sessions/me", headers=auth(cookie))
    assert response.status_code == 401
    assert response.json() == {
        "error": "session_expired",
        "detail": "the session has expired or was closed: log in again",
    }


async def test_logout_kills_the_session(client: httpx.AsyncClient, api: CortexxProcess, world: World):
    cookie = await login(client, api, world.x.agent)
    response = await client.delete(f"{api.url}/api/v1/sessions", headers=auth(cookie))
    assert response.status_code == 204
    assert f"{COOKIE}=" in response.headers["set-cookie"]
    assert "max-age=0" in response.headers["set-cookie"].lower()
    for _ in range(2):
        again = await client.get(f"{api.url}/api/v1/sessions/me", headers=auth(cookie))
        assert again.status_code == 401
        assert again.json()["error"] == "session_expired"
    assert (await client.delete(f"{api.url}/api/v1/sessions", headers=auth(cookie))).status_code == 401


async def test_login_issues_a_new_sid_and_closes_the_one_presented(
    client: httpx.AsyncClient, api: CortexxProcess, world: World, db: asyncpg.Connection
):
    agent = world.x.agent
    first = await login(client, api, agent)
    # Logging in again while presenting the first cookie (what a fixation attack relies on).
    response = await client.post(
        f"{api.url}/api/v1/sessions",
        json={"email": agent.email, "password": PASSWORD},
        headers=auth(first),
    )
    assert response.status_code == 201
    second = session_cookie(response)
    assert second.split(".")[0] != first.split(".")[0]
    assert (await client.get(f"{api.url}/api/v1/sessions/me", headers=auth(first))).status_code == 401
    assert (await client.get(f"{api.url}/api/v1/sessions/me", headers=auth(second))).status_code == 200
    # A sid the attacker planted never becomes a session: only sids we create exist.
    # The table holds the sid's hash, never the sid a cookie carries.
    assert [r["sid"] for r in await _sid_rows(db, agent.id)] == [stored_sid(second.split(".")[0])]


async def test_sessions_roll_on_use(
    client: httpx.AsyncClient, api: CortexxProcess, world: World, db: asyncpg.Connection
):
    cookie = await login(client, api, world.x.agent)
    sid = stored_sid(cookie.split(".")[0])
    # As if the session were last renewed long ago: still valid, due for renewal.
    await db.execute("UPDATE user_sessions SET expire = now() + interval '10 minutes' WHERE sid = $1", sid)
    response = await client.get(f"{api.url}/api/v1/sessions/me", headers=auth(cookie))
    assert response.status_code == 200
    expire = await db.fetchval("SELECT expire - now() FROM user_sessions WHERE sid = $1", sid)
    assert expire.total_seconds() > 3600
    # The browser's cookie is renewed with it.
    assert session_cookie(response) == cookie


async def test_expired_sessions_are_pruned(
    client: httpx.AsyncClient, api: CortexxProcess, world: World, db: asyncpg.Connection
):
    live = await login(client, api, world.x.agent)
    dead = await login(client, api, world.x.colleague)
    await db.execute(
        "UPDATE user_sessions SET expire = now() - interval '1 minute' WHERE sid = $1",
        stored_sid(dead.split(".")[0]),
    )

    async def pruned() -> bool:
        return not await db.fetchval("SELECT count(*) FROM user_sessions WHERE expire <= now()")

    await wait_until(pruned, timeout_s=10, what="expired sessions pruned")
    assert (
        await db.fetchval("SELECT count(*) FROM user_sessions WHERE sid = $1", stored_sid(live.split(".")[0]))
        == 1
    )
    assert "session.pruned" in api.log_path.read_text()


async def test_users_add_command(
    client: httpx.AsyncClient, api: CortexxProcess, world: World, services: ServiceUrls
):
    email = f"new-{os.getpid()}@{world.x.tenant.slug}.test"

    def users_add(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CORTEXX_")}
        env.update(CORTEXX_DATABASE_URL=services.database_url, CORTEXX_DATA_DIR=str(services.data_dir))
        return subprocess.run(
            [sys.executable, "-m", "cli.main", "users", "add", *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )

    done = users_add(
        "--company",
        world.x.tenant.slug,
        "--email",
        email,
        "--password-stdin",
        "--name",
        "New",
        "--role",
        "admin",
        stdin="s3cret-enough\n",
    )
    assert done.returncode == 0, done.stderr
    assert f"added user {email}" in done.stdout
    response = await client.post(
        f"{api.url}/api/v1/sessions", json={"email": email, "password": "s3cret-enough"}
    )
    assert response.status_code == 201
    assert response.json()["user"]["role"] == "admin"
    assert response.json()["user"]["company"]["slug"] == world.x.tenant.slug
    # The same email in another company is refused; an unknown company too; a short password too.
    other = users_add("--company", world.y.tenant.slug, "--email", email, "--password", "whatever-long")
    assert other.returncode == 2
    assert "another company" in other.stderr
    unknown = users_add("--company", "no-such-co", "--email", "a@b.test", "--password", "whatever-long")
    assert unknown.returncode == 2
    short = users_add("--company", world.x.tenant.slug, "--email", "c@d.test", "--password", "short")
    assert short.returncode == 2


async def test_a_password_change_or_a_deactivation_ends_every_session_of_the_user(
    client: httpx.AsyncClient, api: CortexxProcess, world: World, db: asyncpg.Connection
):
    """A stolen session must not outlive a password reset, nor come back when a deactivated user
    is reactivated; the colleague's sessions are untouched."""
    agent, colleague = world.x.agent, world.x.colleague
    me = f"{api.url}/api/v1/sessions/me"
    laptop, phone = await login(client, api, agent), await login(client, api, agent)
    bystander = await login(client, api, colleague)
    await db.execute(
        "UPDATE users SET password_hash = password_hash || '' WHERE id = $1", agent.id
    )  # the same hash: not a change, nothing ends
    assert (await client.get(me, headers=auth(laptop))).status_code == 200
    await db.execute("UPDATE users SET password_hash = $2 WHERE id = $1", agent.id, hash_password(PASSWORD))
    for cookie in (laptop, phone):
        assert (await client.get(me, headers=auth(cookie))).status_code == 401
    assert (await client.get(me, headers=auth(bystander))).status_code == 200

    again = await login(client, api, agent)
    await db.execute("UPDATE users SET is_active = false WHERE id = $1", agent.id)
    await db.execute("UPDATE users SET is_active = true WHERE id = $1", agent.id)
    assert (await client.get(me, headers=auth(again))).status_code == 401
    assert (await client.get(me, headers=auth(bystander))).status_code == 200
