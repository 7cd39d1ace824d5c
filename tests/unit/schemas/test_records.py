"""`meta.webhooks` records: what ingest writes is what the worker reads back, field for field,
and a record that is not one of ours (not JSON, another version, a field missing or of the wrong
type) is a RecordError, which the worker dead-letters, never a crash."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.records import WEBHOOK_RECORD_VERSION, RecordError, WebhookRecord
from tests.unit.strategies import fast, json_objects

records = st.builds(
    WebhookRecord,
    tenant=st.text(max_size=12),
    object=st.sampled_from(["whatsapp_business_account", "page", "instagram"]),
    entry_id=st.text(max_size=12),
    entry_time=st.none() | st.integers(0, 2**53),
    kind=st.sampled_from(["change", "messaging"]),
    field=st.text(max_size=12),
    payload=json_objects,
    request_id=st.text(max_size=12),
    received_at_ms=st.integers(0, 2**53),
    seq=st.integers(0, 5000),
)


@fast(60)
@given(record=records)
def test_a_record_reads_back_as_it_was_written(record: WebhookRecord) -> None:
    assert WebhookRecord.from_bytes(record.to_bytes()) == record


def test_the_version_is_written_into_every_record() -> None:
    record = WebhookRecord("acme", "page", "1", None, "messaging", "messaging", {}, "r", 1, 0)
    assert orjson.loads(record.to_bytes())["v"] == WEBHOOK_RECORD_VERSION


def good() -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(
        WebhookRecord("acme", "page", "1", 5, "messaging", "messaging", {"a": 1}, "r", 1, 0).to_bytes()
    )
    return doc


def test_scalar_fields_of_another_json_type_are_coerced() -> None:
    doc = good() | {"entry_id": 1022, "received_at_ms": "17", "seq": 3.0}
    record = WebhookRecord.from_dict(doc)
    assert (record.entry_id, record.received_at_ms, record.seq) == ("1022", 17, 3)


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b"{", b"[1, 2]", b'"record"', b"null"],
)
def test_bytes_that_are_not_a_record_object_are_refused(raw: bytes) -> None:
    with pytest.raises(RecordError):
        WebhookRecord.from_bytes(raw)


@pytest.mark.parametrize("version", [None, 0, 2, "1"])
def test_a_record_of_another_version_is_refused(version: Any) -> None:
    doc = good()
    if version is None:
        del doc["v"]
    else:
        doc["v"] = version
    with pytest.raises(RecordError, match="version"):
        WebhookRecord.from_dict(doc)


@pytest.mark.parametrize(
    "field",
    ["tenant", "object", "entry_id", "kind", "field", "payload", "request_id", "received_at_ms", "seq"],
)
def test_a_record_missing_a_field_is_refused(field: str) -> None:
    doc = good()
    del doc[field]
    with pytest.raises(RecordError, match="malformed"):
        WebhookRecord.from_dict(doc)


@pytest.mark.parametrize(
    ("field", "value"),
    [("payload", [1, 2]), ("payload", "text"), ("payload", 5), ("seq", "first"), ("received_at_ms", None)],
)
def test_a_field_of_an_unusable_type_is_refused(field: str, value: Any) -> None:
    with pytest.raises(RecordError, match="malformed"):
        WebhookRecord.from_dict(good() | {field: value})


def test_a_missing_entry_time_reads_as_none() -> None:
    doc = good()
    del doc["entry_time"]
    assert WebhookRecord.from_dict(doc).entry_time is None
