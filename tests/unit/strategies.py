"""Hypothesis settings and strategies shared by the unit tier: JSON as orjson reads it, and Meta
envelopes."""

from __future__ import annotations

from typing import Any

from hypothesis import Phase, settings
from hypothesis import strategies as st


def fast(max_examples: int) -> settings:
    """Settings for a tier that must fail fast: no deadline on a busy machine; on a failure, one
    error shrunk and no explain phase (that alone took 90 s on the envelope properties)."""
    return settings(
        deadline=None,
        max_examples=max_examples,
        phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink),
        report_multiple_bugs=False,
    )


# What orjson.loads can return: integers within 64 bits, no NaN, any text.
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=4)

SENDERS = ["4917600000001", "4917600000002", "5511900000003"]
senders = st.sampled_from(SENDERS)
# Business-scoped user ids; a username user may come with no phone number at all.
USER_IDS = ["US.13491208655302741918", "BR.1502576394655843"]
user_ids = st.sampled_from(USER_IDS)

wa_messages = st.fixed_dictionaries(
    {"id": st.text(min_size=1, max_size=6), "type": st.just("text")},
    optional={
        "from": senders,
        "from_user_id": user_ids,
        "text": st.fixed_dictionaries({"body": st.text(max_size=20)}),
    },
)
wa_statuses = st.fixed_dictionaries(
    {"id": st.text(min_size=1, max_size=6), "status": st.sampled_from(["sent", "read"])},
    optional={"recipient_id": senders, "recipient_user_id": user_ids},
)
# A wa_id is a string in Meta's payloads; a number is matched to its sender too.
wa_contacts = st.builds(
    lambda wa_id, user_id, name: {
        k: v
        for k, v in (("wa_id", wa_id), ("user_id", user_id), ("profile", {"name": name}))
        if v is not None
    },
    senders | senders.map(int) | st.none(),
    user_ids | st.none(),
    st.text(max_size=6),
)


@st.composite
def whatsapp_values(draw: st.DrawFn) -> dict[str, Any]:
    """The value of a WhatsApp `messages` change: realistic parts, odd parts, extra fields."""
    value: dict[str, Any] = draw(json_objects)
    for key in ("messages", "statuses", "contacts"):
        value.pop(key, None)
    value["metadata"] = draw(
        st.fixed_dictionaries({"phone_number_id": st.sampled_from(["1065", "2077"])}) | json_scalars
    )
    # Mostly Meta's shapes; now and then a part, or the whole array, that is something else.
    # (`a | b` draws each branch of a flattened one_of alike: the odd shapes get their share here.)
    for key, meta_shape in (("messages", wa_messages), ("statuses", wa_statuses), ("contacts", wa_contacts)):
        shape = draw(st.sampled_from(["meta", "meta", "meta", "mixed", "absent", "odd"]))
        if shape == "meta":
            value[key] = draw(st.lists(meta_shape, max_size=4))
        elif shape == "mixed":
            value[key] = draw(st.lists(meta_shape | json_scalars | json_objects, max_size=4))
        elif shape == "odd":
            value[key] = draw(json_scalars | json_objects)
    return value


changes = st.one_of(
    st.builds(lambda v: {"field": "messages", "value": v}, whatsapp_values()),
    st.builds(lambda f, v: {"field": f, "value": v}, st.sampled_from(["account_update", "x"]), json_objects),
)
messaging_events = st.fixed_dictionaries(
    {},
    optional={
        "sender": st.fixed_dictionaries({"id": st.sampled_from(["page-1", "psid-1"])}) | json_scalars,
        "recipient": st.fixed_dictionaries({"id": st.sampled_from(["page-1", "psid-2"])}) | json_scalars,
        "message": json_objects,
    },
)
entry_ids = st.sampled_from(["1022", "page-1"]) | st.integers(0, 10**15)
entry_times = st.integers(0, 2**40) | json_scalars
# Every entry has changes or messaging events or both: the shapes validation lets through.
entries = st.one_of(
    st.fixed_dictionaries(
        {"id": entry_ids, "changes": st.lists(changes, min_size=1, max_size=3)},
        optional={"time": entry_times},
    ),
    st.fixed_dictionaries(
        {"id": entry_ids, "messaging": st.lists(messaging_events, min_size=1, max_size=2)},
        optional={"time": entry_times},
    ),
    st.fixed_dictionaries(
        {
            "id": entry_ids,
            "changes": st.lists(changes, min_size=1, max_size=2),
            "messaging": st.lists(messaging_events, min_size=1, max_size=2),
        }
    ),
)
envelopes = st.fixed_dictionaries(
    {
        "object": st.sampled_from(["whatsapp_business_account", "page", "instagram"])
        | st.text(min_size=1, max_size=8),
        "entry": st.lists(entries, min_size=1, max_size=3),
    }
)


@st.composite
def nearly_valid_envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """A valid-looking envelope with one place broken: what validation must catch, or split bear."""
    doc: dict[str, Any] = draw(envelopes)
    entry = draw(st.sampled_from(doc["entry"]))
    places = ["object", "entry id", "no entry id", "changes", "messaging"]
    if entry.get("changes"):
        places += ["change", "field", "value", "no value"]
    place = draw(st.sampled_from(places))
    junk = draw(json_scalars | st.lists(json_scalars, max_size=3))  # never the object it should be
    if place == "object":
        doc["object"] = junk
    elif place == "entry id":
        entry["id"] = junk
    elif place == "no entry id":
        del entry["id"]
    elif place in ("changes", "messaging"):
        entry[place] = junk
    else:
        i = draw(st.integers(0, len(entry["changes"]) - 1))
        if place == "change":
            entry["changes"][i] = junk
        elif place == "field":
            entry["changes"][i] = {**entry["changes"][i], "field": junk}
        elif place == "value":
            entry["changes"][i] = {**entry["changes"][i], "value": junk}
        else:
            entry["changes"][i] = {k: v for k, v in entry["changes"][i].items() if k != "value"}
    return doc
