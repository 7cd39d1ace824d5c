"""Which bodies ingest takes for a Meta webhook envelope (the rest is a 422): the shape that lets
every entry and change be routed, at least one and at most Meta's 1,000 updates, and anything
unknown passed through; and no JSON at all can make the check fail with anything but its error."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.meta_samples import (
    messenger_envelope,
    messenger_message,
    wa_change,
    wa_envelope,
    wa_message,
    wa_status,
)
from schemas.meta import MAX_UPDATES, EnvelopeError, validate_envelope
from tests.unit.strategies import fast, json_values


def whatsapp(n_messages: int = 1, n_statuses: int = 0) -> dict[str, Any]:
    return wa_envelope(
        [
            wa_change(
                phone_number_id="1065",
                display_phone_number="15550001",
                contacts=[("4917600000001", "Ana")],
                messages=[
                    wa_message("text", wamid=f"wamid.{i}", from_="4917600000001", timestamp=1_750_000_000)
                    for i in range(n_messages)
                ],
                statuses=[
                    wa_status("delivered", wamid=f"wamid.s{i}", recipient_id="4917600000001", timestamp=1)
                    for i in range(n_statuses)
                ],
            )
        ],
        waba_id="1022",
    )


def test_a_whatsapp_message_is_one_update() -> None:
    assert validate_envelope(whatsapp()) == 1


def test_updates_are_counted_per_change_and_per_messaging_event() -> None:
    doc = whatsapp()
    doc["entry"].append({"id": 99, "changes": [{"field": "account_update", "value": {}}] * 2})
    doc["entry"].append({"id": "page", "messaging": [{"sender": {"id": "1"}}]})
    assert validate_envelope(doc) == 4


def test_a_messenger_envelope_is_accepted() -> None:
    event = messenger_message(mid="m.1", sender_id="psid", recipient_id="page", timestamp_ms=1)
    assert validate_envelope(messenger_envelope([event, event], page_id="page")) == 2


def test_unknown_fields_anywhere_are_accepted() -> None:
    doc = whatsapp()
    doc["new_top_level"] = [1, 2]
    doc["entry"][0]["extra"] = {"x": None}
    doc["entry"][0]["changes"][0]["value"]["brand_new"] = True
    assert validate_envelope(doc) == 1


def test_an_entry_id_may_be_a_number() -> None:
    doc = whatsapp()
    doc["entry"][0]["id"] = 1022
    assert validate_envelope(doc) == 1


def test_exactly_metas_largest_batch_is_accepted_and_one_more_refused() -> None:
    change = {"field": "account_update", "value": {}}
    at_limit = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "1", "changes": [change] * MAX_UPDATES}],
    }
    assert validate_envelope(at_limit) == MAX_UPDATES
    over = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "1", "changes": [change] * (MAX_UPDATES - 1)}, {"id": "2", "messaging": [{}, {}]}],
    }
    with pytest.raises(EnvelopeError, match="at most 1000"):
        validate_envelope(over)


def _without(path: tuple[Any, ...]) -> dict[str, Any]:
    doc = whatsapp()
    target: Any = doc
    for step in path[:-1]:
        target = target[step]
    del target[path[-1]]
    return doc


def _with(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    doc = whatsapp()
    target: Any = doc
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return doc


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        ([], "JSON object"),
        ("envelope", "JSON object"),
        (None, "JSON object"),
        (_without(("object",)), "'object'"),
        (_with(("object",), ""), "'object'"),
        (_with(("object",), 5), "'object'"),
        (_without(("entry",)), "'entry'"),
        (_with(("entry",), []), "'entry'"),
        (_with(("entry",), {"id": "1"}), "'entry'"),
        (_with(("entry", 0), "1022"), r"entry\[0\] must be an object"),
        (_without(("entry", 0, "id")), r"entry\[0\]\.id"),
        (_with(("entry", 0, "id"), None), r"entry\[0\]\.id"),
        (_with(("entry", 0, "id"), 10.5), r"entry\[0\]\.id"),
        (_with(("entry", 0, "id"), ["1022"]), r"entry\[0\]\.id"),
        (_without(("entry", 0, "changes")), "neither 'changes' nor 'messaging'"),
        (_with(("entry", 0, "changes"), {"field": "messages"}), r"changes must be an array"),
        (_with(("entry", 0, "changes"), []), "no change and no messaging event"),
        (_with(("entry", 0, "changes", 0), "messages"), r"changes\[0\]\.field"),
        (_without(("entry", 0, "changes", 0, "field")), r"changes\[0\]\.field"),
        (_with(("entry", 0, "changes", 0, "field"), 1), r"changes\[0\]\.field"),
        (_without(("entry", 0, "changes", 0, "value")), r"changes\[0\]\.value"),
        (_with(("entry", 0, "changes", 0, "value"), [1]), r"changes\[0\]\.value"),
        (_with(("entry", 0, "changes", 0, "value"), "x"), r"changes\[0\]\.value"),
        ({"object": "page", "entry": [{"id": "1", "messaging": {}}]}, "messaging must be an array"),
        ({"object": "page", "entry": [{"id": "1", "messaging": [1]}]}, r"messaging\[0\] must be an object"),
        ({"object": "page", "entry": [{"id": "1", "messaging": []}]}, "no change and no messaging event"),
    ],
)
def test_bodies_that_are_not_envelopes_are_refused_with_the_reason(doc: Any, says: str) -> None:
    with pytest.raises(EnvelopeError, match=says):
        validate_envelope(doc)


def test_a_later_bad_entry_refuses_the_whole_envelope() -> None:
    doc = whatsapp()
    doc["entry"].append({"id": "2", "changes": [{"field": "messages", "value": None}]})
    with pytest.raises(EnvelopeError, match=r"entry\[1\]\.changes\[0\]\.value"):
        validate_envelope(doc)


# Envelope-shaped documents with anything at any place: most are refused, some counted.
envelope_like = st.fixed_dictionaries(
    {},
    optional={
        "object": st.sampled_from(["whatsapp_business_account", "page", "instagram", ""]) | json_values,
        "entry": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "id": st.text(max_size=4) | st.integers() | json_values,
                    "changes": st.lists(
                        st.fixed_dictionaries(
                            {},
                            optional={
                                "field": st.sampled_from(["messages", "x"]) | json_values,
                                "value": json_values,
                            },
                        ),
                        max_size=3,
                    )
                    | json_values,
                    "messaging": st.lists(json_values, max_size=3) | json_values,
                },
            )
            | json_values,
            max_size=3,
        )
        | json_values,
    },
)


@fast(120)
@given(doc=st.one_of(json_values, envelope_like))
def test_any_json_is_either_counted_or_refused_with_an_envelope_error(doc: Any) -> None:
    try:
        updates = validate_envelope(doc)
    except EnvelopeError:
        return
    assert 1 <= updates <= MAX_UPDATES
