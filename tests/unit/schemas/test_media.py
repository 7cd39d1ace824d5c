"""Media jobs and hashes as Meta writes them (schemas/media.py)."""

from __future__ import annotations

import base64
import hashlib

import pytest

from schemas.media import MediaJob, MediaRecordError, sha256_hex

DIGEST = hashlib.sha256(b"receipt").digest()


def test_a_hash_is_read_in_hex_or_in_base64_as_webhooks_carry_it() -> None:
    assert sha256_hex(DIGEST.hex()) == DIGEST.hex()
    assert sha256_hex(DIGEST.hex().upper()) == DIGEST.hex()
    assert sha256_hex(base64.b64encode(DIGEST).decode()) == DIGEST.hex()
    assert sha256_hex(base64.b64encode(DIGEST).decode().rstrip("=")) == DIGEST.hex()
    assert sha256_hex(base64.urlsafe_b64encode(DIGEST).decode()) == DIGEST.hex()


@pytest.mark.parametrize("value", [None, "", 42, "SHA256_HASH", base64.b64encode(b"short").decode()])
def test_anything_else_is_no_hash_rather_than_a_refusal(value: object) -> None:
    assert sha256_hex(value) is None


def test_a_job_round_trips_and_is_keyed_to_spread_over_partitions() -> None:
    job = MediaJob("0b7d…", "acme", 7, "wamid.1", "whatsapp", "1234", "image", 1_700_000_000_000)
    assert MediaJob.from_bytes(job.to_bytes()) == job
    assert job.key == b"acme:0b7d\xe2\x80\xa6"


@pytest.mark.parametrize(
    "raw",
    [
        b"{",
        b"[]",
        b'{"v": 2}',
        b'{"v": 1, "media_id": "x"}',
        b'{"v":1,"media_id":"m","tenant":"t","company_id":1,"message_external_id":"w",'
        b'"source":"ftp","ref":"r","kind":"image","sent_at_ms":1}',
    ],
)
def test_a_record_that_is_no_job_is_refused_with_a_clear_error(raw: bytes) -> None:
    with pytest.raises(MediaRecordError):
        MediaJob.from_bytes(raw)
