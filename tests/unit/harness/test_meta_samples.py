"""`harness.meta_samples.build_plan`, the stream `cortexx simulate` and the batch-store tests post:
users by BSUID and phone, by BSUID and username with no phone anywhere, by phone alone; reactions,
edits and revokes that point at a message of the same user's conversation and are expected on it,
never as messages; one plan per seed. And what the worker's rules (`processors.rows`) read in it
is what the plan expects."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.meta_samples import USER_KINDS, SimulationPlan, build_plan
from ingest.envelope import split_envelope
from processors.autoreply import Company
from processors.rows import to_rows
from schemas.records import WebhookRecord
from tests.unit.strategies import fast

DISPLAY = "15550783881"


def plan_of(seed: int = 7, contacts: int = 12, messages: int = 6, **kw: Any) -> SimulationPlan:
    kw.setdefault("page_id", "112233445566778")
    return build_plan(
        seed=seed,
        contacts=contacts,
        messages_per_contact=messages,
        phone_number_id="106540352242922",
        display_phone_number=DISPLAY,
        waba_id="102290129340398",
        **kw,
    )


def whatsapp_values(plan: SimulationPlan) -> Iterator[dict[str, Any]]:
    for envelope in plan.webhooks:
        if envelope["object"] != "whatsapp_business_account":
            continue
        for entry in envelope["entry"]:
            for change in entry["changes"]:
                if change["field"] == "messages":
                    yield change["value"]


def messages_of(plan: SimulationPlan) -> Iterator[dict[str, Any]]:
    for value in whatsapp_values(plan):
        yield from value.get("messages") or ()


def statuses_of(plan: SimulationPlan) -> Iterator[dict[str, Any]]:
    for value in whatsapp_values(plan):
        yield from value.get("statuses") or ()


def owner_of(plan: SimulationPlan) -> dict[str, str]:
    """Every id a user of the plan wrote under -> the user's key."""
    return {i: u.key for u in plan.users.values() for i in (*u.phones, *u.user_ids)}


PLANS = [(7, 12, 6), (7, 12, 3), (7, 8, 2), (3, 30, 10), (11, 7, 16)]


@pytest.fixture(scope="module", params=PLANS, ids=lambda p: "seed{}-{}x{}".format(*p))
def plan(request: pytest.FixtureRequest) -> SimulationPlan:
    seed, contacts, messages = request.param
    return plan_of(seed, contacts, messages)


def test_every_kind_of_user_is_in_a_plan_of_three_or_more(plan: SimulationPlan) -> None:
    kinds = Counter(u.kind for u in plan.users.values())
    assert set(kinds) == set(USER_KINDS)
    assert max(kinds.values()) - min(kinds.values()) <= 1  # given out in turn
    for u in plan.users.values():
        assert (u.phone is None) == (u.kind == "username")
        assert (u.user_id is None) == (u.kind == "phone")
        assert (u.kind != "username") or u.username is not None
        assert u.key in (*u.phones, *u.user_ids)


def test_a_username_users_phone_is_nowhere_in_their_payloads(plan: SimulationPlan) -> None:
    usernames = {i for u in plan.users.values() if u.kind == "username" for i in u.user_ids}
    assert usernames
    seen = 0
    for value in whatsapp_values(plan):
        for card in value.get("contacts") or ():
            if card.get("user_id") in usernames:
                seen += 1
                assert "wa_id" not in card, card
                assert card["profile"]["username"].startswith("@")
        for m in value.get("messages") or ():
            if m.get("from_user_id") in usernames:
                seen += 1
                assert "from" not in m, m
                assert "from" not in (m.get("context") or {}), m
        for s in value.get("statuses") or ():
            # Nothing the business sends reaches a user without a phone: no status names them.
            assert s.get("recipient_user_id") not in usernames, s
    assert seen
    # Nor does the plan expect a message to them, or one under a phone.
    users = {u.key: u for u in plan.users.values()}
    for e in plan.expected.values():
        if e.user is not None and users[e.user].kind == "username":
            assert e.direction == "inbound" and e.contact in usernames, e


def test_bsuid_users_come_with_phone_and_bsuid_and_phone_users_without_a_bsuid(plan: SimulationPlan) -> None:
    owner, users = owner_of(plan), plan.users
    for value in whatsapp_values(plan):
        for card in value.get("contacts") or ():
            user = users[owner[card.get("user_id") or card["wa_id"]]]
            if user.kind == "bsuid":
                assert card["wa_id"] in user.phones and card["user_id"] in user.user_ids, card
            elif user.kind == "phone":
                assert "user_id" not in card and card["profile"]["name"] == user.name, card
        for m in value.get("messages") or ():
            user = users[owner[m.get("from_user_id") or m["from"]]]
            if user.kind == "bsuid":
                assert m["from"] in user.phones and m["from_user_id"] in user.user_ids, m
            elif user.kind == "phone":
                assert "from_user_id" not in m, m
    recipients: Counter[str] = Counter()
    for s in statuses_of(plan):
        user = users[owner[s["recipient_id"]]]
        assert user.phone is not None
        if user.kind == "phone" or s["status"] == "failed":
            # Meta leaves the BSUID out of a failed status for a message sent to a number.
            assert "recipient_user_id" not in s, s
        else:
            assert s["recipient_user_id"] in user.user_ids, s
            recipients[user.kind] += 1
    assert recipients["bsuid"]


def test_reactions_edits_and_revokes_point_at_a_message_of_their_users_conversation(
    plan: SimulationPlan,
) -> None:
    expected, owner = plan.expected, owner_of(plan)
    assert plan.reactions and plan.edits and plan.revokes
    for (target, user), reaction in plan.reactions.items():
        assert (reaction.target, reaction.user) == (target, user)
        assert expected[target].user == user and expected[target].channel == "whatsapp"
        assert expected[target].type != "system"
    for target, edit in plan.edits.items():
        assert expected[target].user == edit.user
        assert (expected[target].direction, expected[target].type) == ("inbound", "text")
    for target, revoke in plan.revokes.items():
        assert expected[target].user == revoke.user and expected[target].direction == "inbound"
        assert expected[target].type != "system"

    # In the payloads: each names its target, and comes from the target's user.
    listed = plan.amendment_ids()
    found: dict[str, set[str]] = {"reaction": set(), "edit": set(), "revoke": set()}
    for m in messages_of(plan):
        kind = m["type"]
        if kind not in ("reaction", "edit", "revoke"):
            assert m["id"] not in listed
            continue
        assert m["id"] in listed
        found[kind].add(m["id"])  # (an envelope re-sent carries it again)
        part = m[kind]
        target = part["message_id"] if kind == "reaction" else part["original_message_id"]
        user = owner[m.get("from_user_id") or m["from"]]
        assert expected[target].user == user, m
        if kind == "reaction":
            assert m["id"] in plan.reactions[target, user].reactions
        elif kind == "edit":
            assert m["id"] in plan.edits[target].edits
        else:
            assert plan.revokes[target].revoke == m["id"]
    assert found["reaction"] == {i for r in plan.reactions.values() for i in r.reactions}
    assert found["edit"] == {i for e in plan.edits.values() for i in e.edits}
    assert found["revoke"] == {r.revoke for r in plan.revokes.values()}
    # Reactions and edits are not messages, nor are they among the messages expected.
    assert not listed & set(expected)


def test_the_last_reaction_and_the_last_edit_sent_are_what_is_expected(plan: SimulationPlan) -> None:
    owner = owner_of(plan)
    latest_reaction: dict[tuple[str, str], tuple[int, str | None]] = {}
    latest_edit: dict[str, tuple[int, str]] = {}
    for m in messages_of(plan):
        at = int(m["timestamp"])
        if m["type"] == "reaction":
            key = (m["reaction"]["message_id"], owner[m.get("from_user_id") or m["from"]])
            if key not in latest_reaction or at > latest_reaction[key][0]:
                latest_reaction[key] = (at, m["reaction"].get("emoji"))
        elif m["type"] == "edit":
            target = m["edit"]["original_message_id"]
            if target not in latest_edit or at > latest_edit[target][0]:
                latest_edit[target] = (at, m["edit"]["message"]["text"]["body"])
    assert {k: v[1] for k, v in latest_reaction.items()} == {k: r.emoji for k, r in plan.reactions.items()}
    assert {k: v[1] for k, v in latest_edit.items()} == {k: e.body for k, e in plan.edits.items()}


def test_some_reactions_are_removed_some_edits_twice_some_replies_forwards_and_referrals() -> None:
    plan = plan_of(3, 30, 10)
    assert any(r.emoji is None for r in plan.reactions.values())
    assert any(r.emoji is not None and len(r.reactions) > 1 for r in plan.reactions.values())
    assert any(len(e.edits) > 1 for e in plan.edits.values())
    inbound = [e for e in plan.expected.values() if e.channel == "whatsapp" and e.direction == "inbound"]
    assert any(e.reply_to in plan.expected and e.type == "text" for e in inbound)
    assert any(e.forwarded and e.reply_to is None for e in inbound)
    referred = [e for e in inbound if e.referral]
    assert referred and len({e.user for e in referred}) == len(referred)  # a chat's first only
    for e in inbound:
        if e.type in ("interactive", "button"):
            assert plan.expected[e.reply_to or ""].direction == "outbound"
            assert plan.expected[e.reply_to or ""].final_status != "failed"


def test_a_seed_is_one_plan_and_another_seed_another() -> None:
    one, again, other = plan_of(5), plan_of(5), plan_of(6)
    assert orjson.dumps(one.webhooks) == orjson.dumps(again.webhooks)
    assert (one.expected, one.users, one.reactions, one.edits, one.revokes, one.contacts) == (
        again.expected,
        again.users,
        again.reactions,
        again.edits,
        again.revokes,
        again.contacts,
    )
    assert orjson.dumps(one.webhooks) != orjson.dumps(other.webhooks)
    assert set(one.expected).isdisjoint(other.expected)
    # The start time moves the clock, not the ids: a later run of a seed re-sends the same ones.
    later = plan_of(5, start_ts=1_800_000_000)
    assert set(later.expected) == set(one.expected) and later.reactions.keys() == one.reactions.keys()


def _rows(plan: SimulationPlan) -> Any:
    company = Company(1, "acme", None, None, None, "UTC", None)
    records = [
        WebhookRecord.from_bytes(value)
        for i, envelope in enumerate(plan.webhooks)
        for _, value in split_envelope(envelope, tenant="acme", request_id=f"r{i}", received_at_ms=i)
    ]
    return to_rows(records, {"acme": company})


@given(seed=st.integers(0, 10_000), contacts=st.integers(0, 9), messages=st.integers(0, 17))
@fast(25)
def test_the_workers_rules_read_in_any_plan_what_it_expects(seed: int, contacts: int, messages: int) -> None:
    """Split as ingest splits it and read by `processors.rows`: the plan's messages and no
    other, each with its reply and forward; its reactions, edits and revokes on their targets,
    the last sent of each winning; a username user's party has no phone."""
    plan = plan_of(seed, contacts, messages, page_id=None)
    rows = _rows(plan)
    assert rows.poison == []
    unique = {m.external_id: m for m in rows.messages}
    outbound = {k for k, e in plan.expected.items() if e.direction == "outbound"}
    assert set(unique) == set(plan.expected) - outbound
    for key, m in unique.items():
        e = plan.expected[key]
        assert (m.kind, m.reply_to, m.forwarded, m.referral is not None) == (
            e.type,
            e.reply_to,
            e.forwarded,
            e.referral,
        ), key
    assert {s.external_id for s in rows.statuses} == outbound
    latest: dict[tuple[str, str], Any] = {}
    for r in rows.reactions:
        key = (r.target, owner_of(plan)[r.party.user_id or r.party.phone or ""])
        if key not in latest or r.at > latest[key].at:
            latest[key] = r
    assert {k: r.emoji for k, r in latest.items()} == {k: r.emoji for k, r in plan.reactions.items()}
    edits = [a for a in rows.amendments if a.kind == "edit"]
    last = {a.target: a.body for a in sorted(edits, key=lambda a: a.at)}
    assert last == {k: e.body for k, e in plan.edits.items()}
    assert {a.target for a in rows.amendments if a.kind == "revoke"} == set(plan.revokes)
    usernames = {u.user_id for u in plan.users.values() if u.kind == "username"}
    for party in rows.contacts().values():
        if party.user_id in usernames:
            assert party.phone is None and party.username is not None
