"""Messages as WhatsApp users see them, end to end (ingest, the worker, the read API): reactions
on their message, edits replacing the text with the earlier versions kept, revoked messages
hidden but kept, replies linked to what they quote, forwards marked, an ad's referral, Meta's
errors; in whatever order Meta delivers them, once under redelivery, and never counted as
messages (unread counts, notifications)."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from tests.desk import NOW, Desk, Json, bsuid, card, envelope, text, wamid
from tests.support import wait_until

pytestmark = pytest.mark.usefixtures("ingest", "worker", "api")

PHONE = "5511987650777"


def reaction(user: str, target: str, emoji: str | None, at: int, id_: str | None = None) -> Json:
    part: dict[str, Any] = {"message_id": target}
    if emoji is not None:
        part["emoji"] = emoji  # Meta leaves it out when the reaction is removed
    return {
        "from": PHONE,
        "from_user_id": user,
        "id": id_ or wamid(),
        "timestamp": str(at),
        "type": "reaction",
        "reaction": part,
    }


def edit(user: str, target: str, body: str, at: int) -> Json:
    return {
        "from": PHONE,
        "from_user_id": user,
        "id": wamid(),
        "timestamp": str(at),
        "type": "edit",
        "edit": {"original_message_id": target, "message": {"type": "text", "text": {"body": body}}},
    }


def revoke(user: str, target: str, at: int) -> Json:
    return {
        "from": PHONE,
        "from_user_id": user,
        "id": wamid(),
        "timestamp": str(at),
        "type": "revoke",
        "revoke": {"original_message_id": target},
    }


async def _settled(desk: Desk, probe: Any) -> Any:
    return await wait_until(probe, timeout_s=20)


async def _one_message(desk: Desk, external_id: str) -> Json:
    async def found() -> Json | None:
        for conversation in (await desk.get("/conversations?limit=50"))["items"]:
            for m in (await desk.get(f"/conversations/{conversation['id']}/messages"))["items"]:
                if m["external_id"] == external_id:
                    return dict(m)
        return None

    return await _settled(desk, found)


async def _notifications(db: asyncpg.Connection, desk: Desk) -> int:
    return int(await db.fetchval("SELECT count(*) FROM notifications WHERE company_id = $1", desk.tenant.id))


async def test_reactions_show_on_their_message_one_per_person_the_latest_winning(
    desk: Desk, db: asyncpg.Connection
) -> None:
    user, other = bsuid(), bsuid()
    target = wamid()
    await desk.post(
        envelope(
            contacts=[card(user_id=user, phone=PHONE)],
            messages=[text(user_id=user, phone=PHONE, body="Is it in stock?", at=NOW, id_=target)],
        )
    )
    [conversation] = await desk.conversations(1)
    await _one_message(desk, target)
    notified = await _notifications(db, desk)

    first = reaction(user, target, "👍", NOW + 10)
    await desk.post(envelope(contacts=[card(user_id=user, phone=PHONE)], messages=[first]))
    await desk.post(
        envelope(contacts=[card(user_id=user, phone=PHONE)], messages=[reaction(user, target, "❤️", NOW + 20)])
    )
    await desk.post(envelope(contacts=[card(user_id=user, phone=PHONE)], messages=[first]))  # redelivered
    # Someone else's reaction (a group, or a second device's user) stands beside it.
    await desk.post(
        envelope(
            contacts=[card(user_id=other, phone=None, username="@sis")],
            messages=[{**reaction(other, target, "😂", NOW + 15), "from": None}],
        )
    )

    async def reacted() -> list[str] | None:
        m = await _one_message(desk, target)
        emojis = sorted(r["emoji"] for r in m["reactions"])
        return emojis if emojis == sorted(["❤️", "😂"]) else None

    await _settled(desk, reacted)
    messages = (await desk.get(f"/conversations/{conversation['id']}/messages"))["items"]
    assert [m["external_id"] for m in messages] == [target]  # a reaction is not a message
    detail = await desk.get(f"/conversations/{conversation['id']}")
    assert detail["unread_count"] == 1
    assert detail["last_message_preview"] == "Is it in stock?"
    assert await _notifications(db, desk) == notified

    # Removed (no emoji): gone, and the removed one redelivered stays removed.
    await desk.post(
        envelope(
            contacts=[card(user_id=user, phone=PHONE)], messages=[reaction(user, target, None, NOW + 30)]
        )
    )
    await desk.post(
        envelope(contacts=[card(user_id=user, phone=PHONE)], messages=[reaction(user, target, "❤️", NOW + 20)])
    )

    async def removed() -> bool:
        m = await _one_message(desk, target)
        return [r["emoji"] for r in m["reactions"]] == ["😂"]

    await _settled(desk, removed)


async def test_a_reaction_or_an_edit_that_arrives_before_its_message_shows_once_it_lands(desk: Desk) -> None:
    user = bsuid()
    target = wamid()
    contacts = [card(user_id=user, phone=PHONE)]
    await desk.post(envelope(contacts=contacts, messages=[reaction(user, target, "🙏", NOW + 5)]))
    await desk.post(envelope(contacts=contacts, messages=[edit(user, target, "See you at 6", NOW + 6)]))
    await desk.post(
        envelope(
            contacts=contacts,
            messages=[text(user_id=user, phone=PHONE, body="See you at 5", at=NOW, id_=target)],
        )
    )

    async def shown() -> Json | None:
        m = await _one_message(desk, target)
        return m if m["reactions"] and m["edited_at"] else None

    m = await _settled(desk, shown)
    assert m["body"] == "See you at 6"
    assert [r["emoji"] for r in m["reactions"]] == ["🙏"]
    [conversation] = await desk.conversations(1)
    assert conversation["last_message_preview"] == "See you at 6"


async def test_an_edit_replaces_the_text_and_keeps_the_earlier_versions(
    desk: Desk, db: asyncpg.Connection
) -> None:
    user = bsuid()
    target = wamid()
    contacts = [card(user_id=user, phone=PHONE)]
    await desk.post(
        envelope(
            contacts=contacts, messages=[text(user_id=user, phone=PHONE, body="helo", at=NOW, id_=target)]
        )
    )
    await _one_message(desk, target)
    second, first = edit(user, target, "hello!!", NOW + 20), edit(user, target, "hello", NOW + 10)
    for change in (second, first, second):  # out of order, and redelivered
        await desk.post(envelope(contacts=contacts, messages=[change]))

    async def versions() -> list[asyncpg.Record]:
        return await db.fetch(
            "SELECT body FROM message_amendments WHERE company_id = $1 AND message_external_id = $2"
            " ORDER BY at",
            desk.tenant.id,
            target,
        )

    async def edited() -> Json | None:
        # Both edits written (the earlier one came second), then what the agent sees.
        if len(await versions()) < 2:
            return None
        return await _one_message(desk, target)

    m = await _settled(desk, edited)
    assert m["body"] == "hello!!"
    assert m["edited_at"] is not None and not m["deleted"]
    assert [v["body"] for v in await versions()] == ["hello", "hello!!"]
    original = await db.fetchval("SELECT original_body FROM messages WHERE external_id = $1", target)
    assert original == "helo"
    [conversation] = await desk.conversations(1)
    assert conversation["unread_count"] == 1  # an edit is not a new message


async def test_a_revoked_message_is_marked_deleted_its_content_hidden_but_kept(
    desk: Desk, db: asyncpg.Connection
) -> None:
    user = bsuid()
    target = wamid()
    contacts = [card(user_id=user, phone=PHONE)]
    await desk.post(
        envelope(
            contacts=contacts,
            messages=[text(user_id=user, phone=PHONE, body="my card is 4111...", at=NOW, id_=target)],
        )
    )
    await _one_message(desk, target)
    gone = revoke(user, target, NOW + 30)
    await desk.post(envelope(contacts=contacts, messages=[gone]))
    await desk.post(envelope(contacts=contacts, messages=[gone]))

    async def deleted() -> Json | None:
        m = await _one_message(desk, target)
        return m if m["deleted"] else None

    m = await _settled(desk, deleted)
    assert m["body"] is None
    [conversation] = await desk.conversations(1)
    assert conversation["last_message_preview"] == ""
    assert "4111" not in str(await desk.get(f"/conversations/{conversation['id']}/messages"))
    kept = await db.fetchrow("SELECT body, deleted_at FROM messages WHERE external_id = $1", target)
    assert kept["body"] == "my card is 4111..." and kept["deleted_at"] is not None  # for audit
    assert (
        await db.fetchval("SELECT count(*) FROM message_amendments WHERE external_id = $1", gone["id"]) == 1
    )


async def test_a_reply_links_what_it_quotes_and_a_forward_is_marked(desk: Desk) -> None:
    user = bsuid()
    quoted, answer, forwarded = wamid(), wamid(), wamid()
    contacts = [card(user_id=user, phone=PHONE)]
    await desk.post(
        envelope(
            contacts=contacts,
            messages=[text(user_id=user, phone=PHONE, body="Which size?", at=NOW, id_=quoted)],
        )
    )
    reply = text(user_id=user, phone=PHONE, body="Medium", at=NOW + 5, id_=answer)
    reply["context"] = {"from": "15550783881", "id": quoted}
    forward = text(user_id=user, phone=PHONE, body="Look at this", at=NOW + 6, id_=forwarded)
    forward["context"] = {"frequently_forwarded": True}
    await desk.post(envelope(contacts=contacts, messages=[reply, forward]))

    m = await _one_message(desk, answer)
    assert m["reply_to"]["external_id"] == quoted
    assert m["reply_to"]["body"] == "Which size?"
    assert m["reply_to"]["id"] == (await _one_message(desk, quoted))["id"]
    assert not m["forwarded"]
    f = await _one_message(desk, forwarded)
    assert f["forwarded"] and f["reply_to"] is None


async def test_an_ads_referral_is_kept_on_the_conversation_and_errors_are_visible(desk: Desk) -> None:
    user = bsuid()
    first, unsupported = wamid(), wamid()
    referral = {
        "source_url": "https://fb.me/3cr4Wqqkv",
        "source_id": "120226305854810726",
        "source_type": "ad",
        "headline": "Chat with us",
        "body": "Summer Succulents are here!",
        "media_type": "image",
        "image_url": "https://scontent.xx.fbcdn.net/ad.jpg",
        "ctwa_clid": "Aff-n8ZTODiE79d2",
    }
    message = text(user_id=user, phone=PHONE, body="I saw your ad", at=NOW, id_=first)
    message["referral"] = referral
    errors = [
        {
            "code": 131051,
            "title": "Message type unknown",
            "message": "Message type unknown",
            "error_data": {"details": "Message type is currently not supported."},
        }
    ]
    odd = {
        "from": PHONE,
        "from_user_id": user,
        "id": unsupported,
        "timestamp": str(NOW + 5),
        "type": "unsupported",
        "unsupported": {"type": "poll"},
        "errors": errors,
    }
    await desk.post(envelope(contacts=[card(user_id=user, phone=PHONE)], messages=[message, odd]))
    failed = wamid()
    status_errors = [
        {
            "code": 131049,
            "title": "This message was not delivered to maintain healthy ecosystem engagement.",
            "href": "/documentation/business-messaging/whatsapp/support/error-codes",
        }
    ]
    await desk.post(
        envelope(
            statuses=[
                {
                    "id": failed,
                    "status": "failed",
                    "timestamp": str(NOW + 9),
                    "recipient_id": PHONE,
                    "errors": status_errors,
                }
            ]
        )
    )

    m = await _one_message(desk, first)
    assert m["referral"] == referral
    [conversation] = await desk.conversations(1)
    assert conversation["referral"] == referral
    u = await _one_message(desk, unsupported)
    assert u["body"] == "[unsupported: poll]" and u["error"] == errors
    f = await _one_message(desk, failed)
    assert f["status"] == "failed" and f["error"] == status_errors
