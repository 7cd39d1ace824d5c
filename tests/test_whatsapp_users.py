"""WhatsApp users by business-scoped user id (BSUID) and username, end to end: signed webhooks
into ingest, the worker's rows, and what an agent sees and can do through the read API."""

from __future__ import annotations

import secrets

import pytest

from infra.kafka.topics import WUZAPI_OUTBOUND
from infra.postgres.db import connect
from infra.postgres.migrate import migrate, migration_files
from schemas.outbound import OutboundMessage, OutboundRecordError
from tests.api.world import auth
from tests.desk import NOW, Desk, bsuid, card, envelope, text, wamid
from tests.support import ServiceUrls, read_topic, wait_until

pytestmark = pytest.mark.usefixtures("ingest", "worker", "api")


async def test_a_user_seen_with_phone_and_later_by_username_alone_is_one_contact(desk: Desk) -> None:
    user = bsuid()
    await desk.post(
        envelope(
            contacts=[card(user_id=user, phone="5511987650001", name="Pablo Morales")],
            messages=[text(user_id=user, phone="5511987650001", body="Hi, it's Pablo", at=NOW)],
        )
    )
    await desk.conversations(1)
    # He adopts a username and stops sharing his number: Meta sends the BSUID alone.
    await desk.post(
        envelope(
            contacts=[card(user_id=user, phone=None, name="Pablo M.", username="@pablomorales")],
            messages=[text(user_id=user, phone=None, body="Still me", at=NOW + 5)],
        )
    )
    [conversation] = await desk.conversations(1)
    messages = await desk.messages_of(conversation["id"], 2)
    assert [m["body"] for m in messages] == ["Still me", "Hi, it's Pablo"]
    contact = (await desk.get(f"/conversations/{conversation['id']}"))["contact"]
    assert contact["user_id"] == user
    assert contact["username"] == "@pablomorales"
    assert contact["phone_number"] == "5511987650001"  # as known: it was shared once
    assert contact["name"] == "Pablo M."


async def test_two_username_users_of_one_number_are_two_contacts(desk: Desk) -> None:
    first, second = bsuid(), bsuid()
    await desk.post(
        envelope(
            contacts=[
                card(user_id=first, phone=None, name="Ana", username="@ana"),
                card(user_id=second, phone=None, name="Bea", username="@bea"),
            ],
            messages=[
                text(user_id=first, phone=None, body="from Ana", at=NOW),
                text(user_id=second, phone=None, body="from Bea", at=NOW + 1),
            ],
        )
    )
    conversations = await desk.conversations(2)
    by_user = {c["contact"]["user_id"]: c for c in conversations}
    assert set(by_user) == {first, second}
    assert {c["contact"]["username"] for c in conversations} == {"@ana", "@bea"}
    assert all(c["contact"]["phone_number"] is None for c in conversations)
    assert all(c["unread_count"] == 1 for c in conversations)
    for user, body in ((first, "from Ana"), (second, "from Bea")):
        [message] = await desk.messages_of(by_user[user]["id"], 1)
        assert message["body"] == body


async def test_a_status_finds_its_contact_by_recipient_user_id(desk: Desk) -> None:
    user = bsuid()
    await desk.post(
        envelope(
            contacts=[card(user_id=user, phone=None, username="@caro")],
            messages=[text(user_id=user, phone=None, body="hello", at=NOW)],
        )
    )
    [conversation] = await desk.conversations(1)
    sent = wamid()  # a message the business sent from elsewhere, known here by its statuses
    await desk.post(
        envelope(
            contacts=[card(user_id=user, phone=None, username="@caro")],
            statuses=[{"id": sent, "status": "read", "timestamp": str(NOW + 9), "recipient_user_id": user}],
        )
    )
    messages = await desk.messages_of(conversation["id"], 2)
    [outbound] = [m for m in messages if m["external_id"] == sent]
    assert outbound["direction"] == "outbound" and outbound["status"] == "read"
    assert len(await desk.conversations(1)) == 1


async def test_a_changed_user_id_keeps_one_contact_and_conversation(desk: Desk) -> None:
    old, new = bsuid(), bsuid()
    await desk.post(
        envelope(
            contacts=[card(user_id=old, phone=None, username="@dora")],
            messages=[text(user_id=old, phone=None, body="before", at=NOW)],
        )
    )
    [conversation] = await desk.conversations(1)
    await desk.post(
        envelope(
            "user_id_update",
            user_id_update=[
                {
                    "detail": "User id for Dora has been updated.",
                    "user_id": {"previous": old, "current": new},
                    "timestamp": str(NOW + 1),
                }
            ],
        )
    )
    await desk.post(
        envelope(
            contacts=[card(user_id=new, phone=None, username="@dora")],
            messages=[text(user_id=new, phone=None, body="after", at=NOW + 2)],
        )
    )
    # A late message under the old id still finds her.
    await desk.post(
        envelope(
            contacts=[card(user_id=old, phone=None, username="@dora")],
            messages=[text(user_id=old, phone=None, body="late", at=NOW + 3)],
        )
    )
    messages = await desk.messages_of(conversation["id"], 3)
    assert sorted(m["body"] for m in messages) == ["after", "before", "late"]
    [only] = await desk.conversations(1)
    assert only["id"] == conversation["id"]
    assert only["contact"]["user_id"] == new


async def test_a_changed_number_system_message_links_the_new_id_even_after_the_new_id_wrote(
    desk: Desk,
) -> None:
    old, new = bsuid(), bsuid()
    before = envelope(
        contacts=[card(user_id=old, phone="4917600000101", name="Emil")],
        messages=[text(user_id=old, phone="4917600000101", body="old number", at=NOW)],
    )
    await desk.post(before)
    await desk.conversations(1)
    # The new number writes before the system message arrives: a second contact for a moment.
    await desk.post(
        envelope(
            contacts=[card(user_id=new, phone="4917600000202", name="Emil")],
            messages=[text(user_id=new, phone="4917600000202", body="new number", at=NOW + 20)],
        )
    )
    await desk.conversations(2)
    system = {
        "from": "4917600000101",
        "id": wamid(),
        "timestamp": str(NOW + 10),
        "type": "system",
        "system": {
            "body": "User Emil changed from 4917600000101 to 4917600000202",
            "wa_id": "4917600000202",
            "user_id": new,
            "previous_user_id": old,
            "type": "user_changed_number",
        },
    }
    await desk.post(envelope(messages=[system]))
    [conversation] = await desk.conversations(1)
    messages = await desk.messages_of(conversation["id"], 3)
    conversation = await desk.get(f"/conversations/{conversation['id']}")
    assert [m["body"] for m in sorted(messages, key=lambda m: m["sent_at"])] == [
        "old number",
        "User Emil changed from 4917600000101 to 4917600000202",
        "new number",
    ]
    assert conversation["contact"]["phone_number"] == "4917600000202"
    assert conversation["contact"]["user_id"] == new
    assert conversation["unread_count"] == 3
    # The agent's notifications lead to the one conversation, that of the new number's too.
    notes = (await desk.get("/notifications"))["items"]
    assert len(notes) == 3 and {n["conversation_id"] for n in notes} == {conversation["id"]}

    # Meta redelivers the record from before the change, and one sent before it arrives late:
    # both name the old BSUID and the old number, which is no longer the user's. The late one
    # joins the conversation; the number does not move back.
    await desk.post(before)
    late = text(user_id=old, phone="4917600000101", body="sent before the change", at=NOW + 5)
    await desk.post(
        envelope(contacts=[card(user_id=old, phone="4917600000101", name="Emil")], messages=[late])
    )
    await desk.messages_of(conversation["id"], 4)
    [conversation] = await desk.conversations(1)
    assert conversation["contact"]["phone_number"] == "4917600000202"
    assert conversation["contact"]["user_id"] == new


async def test_a_number_change_of_a_user_known_by_phone_alone_keeps_one_contact(desk: Desk) -> None:
    """Before BSUIDs (or without one), a number change links the numbers: a record that still
    names the old one afterwards (a redelivery, a late status) finds the same contact, and the
    number stays the new one."""
    old, new = "4917600000301", "4917600000302"
    before = envelope(
        contacts=[card(user_id=None, phone=old, name="Greta")],
        messages=[text(user_id=None, phone=old, body="from the old number", at=NOW)],
    )
    await desk.post(before)
    [conversation] = await desk.conversations(1)
    system = {
        "from": old,
        "id": wamid(),
        "timestamp": str(NOW + 10),
        "type": "system",
        "system": {
            "body": f"User Greta changed from {old} to {new}",
            "wa_id": new,
            "type": "customer_changed_number",
        },
    }
    await desk.post(envelope(messages=[system]))
    await desk.post(envelope(messages=[text(user_id=None, phone=new, body="from the new one", at=NOW + 20)]))
    await desk.messages_of(conversation["id"], 3)
    await desk.post(before)
    late = {"id": wamid(), "status": "delivered", "timestamp": str(NOW + 30), "recipient_id": old}
    await desk.post(envelope(statuses=[late]))
    await desk.messages_of(conversation["id"], 4)  # the late status's message, in this conversation
    [conversation] = await desk.conversations(1)
    assert conversation["contact"]["phone_number"] == new
    assert conversation["unread_count"] == 3


async def _outbound_for(services: ServiceUrls, conversation_id: int) -> list[OutboundMessage]:
    records = []
    # The topic is shared with the suite's other tests, some of which put garbage on it.
    for r in await read_topic(services.kafka_bootstrap, WUZAPI_OUTBOUND):
        try:
            records.append(OutboundMessage.from_bytes(r.value))
        except OutboundRecordError:
            continue
    return [r for r in records if r.conversation_id == conversation_id]


async def test_a_reply_to_a_user_without_a_phone_is_refused_until_one_is_known(
    desk: Desk, services: ServiceUrls
) -> None:
    user = bsuid()
    await desk.post(
        envelope(
            contacts=[card(user_id=user, phone=None, username="@fabi")],
            messages=[text(user_id=user, phone=None, body="hola", at=NOW)],
        )
    )
    [conversation] = await desk.conversations(1)
    url = f"{desk.api.url}/api/v1/conversations/{conversation['id']}/messages"
    response = await desk.client.post(url, json={"text": "Hi!"}, headers=auth(desk.cookie))
    assert response.status_code == 409, response.text
    assert response.json()["error"] == "contact_has_no_phone_number"
    assert "@fabi" in response.json()["detail"]
    assert [m["body"] for m in await desk.messages_of(conversation["id"], 1)] == ["hola"]  # nothing stored
    assert await _outbound_for(services, conversation["id"]) == []  # nothing queued

    # She shares her number (a message with `from`): now a reply goes out to it.
    await desk.post(
        envelope(
            contacts=[card(user_id=user, phone="34612000303", username="@fabi")],
            messages=[text(user_id=user, phone="34612000303", body="my number", at=NOW + 5)],
        )
    )
    await desk.messages_of(conversation["id"], 2)
    response = await desk.client.post(url, json={"text": "Hi!"}, headers=auth(desk.cookie))
    assert response.status_code == 202, response.text
    [record] = await wait_until(lambda: _outbound_for(services, conversation["id"]), timeout_s=10)
    assert record.to == "34612000303"


async def test_contacts_from_before_bsuids_migrate_without_loss_and_are_found_by_phone(
    services: ServiceUrls,
) -> None:
    """A database at 0013 with contacts by phone: 0014 keeps every row, and a webhook with the
    phone and a BSUID finds the old contact and conversation rather than making new ones."""
    name = f"mig_{secrets.token_hex(4)}"
    admin = await connect(services.database_url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    url = services.database_url.rsplit("/", 1)[0] + f"/{name}"
    conn = await connect(url)
    try:
        await conn.execute(
            "CREATE TABLE schema_migrations (version text PRIMARY KEY, applied_at timestamptz "
            "NOT NULL DEFAULT now())"
        )
        for version, sql in migration_files():
            if version >= "0014":
                break
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
        company = await conn.fetchval(
            "INSERT INTO companies (slug, name, app_secret, verify_token) "
            "VALUES ('old', 'Old', 's', 'v') RETURNING id"
        )
        contact = await conn.fetchval(
            "INSERT INTO contacts (company_id, phone_number, name) "
            "VALUES ($1, '4917600000999', 'Gert') RETURNING id",
            company,
        )
        conversation = await conn.fetchval(
            "INSERT INTO conversations (company_id, contact_id) VALUES ($1, $2) RETURNING id",
            company,
            contact,
        )
        await conn.execute(
            "INSERT INTO messages (company_id, conversation_id, external_id, direction, type, body, "
            "status, sent_at) "
            "VALUES ($1, $2, 'wamid.old', 'inbound', 'text', 'from 2025', 'received', now())",
            company,
            conversation,
        )
        assert await migrate(url) == [v for v, _ in migration_files() if v >= "0014"]
        row = await conn.fetchrow("SELECT phone_number, name, user_id FROM contacts WHERE id = $1", contact)
        assert tuple(row) == ("4917600000999", "Gert", None)
        assert await conn.fetchval("SELECT body FROM messages WHERE external_id = 'wamid.old'") == "from 2025"
        found = await conn.fetchrow(
            "SELECT * FROM contact_for($1, 'whatsapp', '4917600000999', 'DE.1234567890', NULL, NULL, NULL)",
            company,
        )
        assert found["id"] == contact
        assert await conn.fetchval("SELECT user_id FROM contacts WHERE id = $1", contact) == "DE.1234567890"
        assert await conn.fetchval("SELECT count(*) FROM contacts") == 1
    finally:
        await conn.close()
