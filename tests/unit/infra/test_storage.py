"""The media store's pure rules: which keys are keys, and which URLs name a store (no store is
reached: obstore connects on first use, and an s3:// store is only configured here)."""

from __future__ import annotations

import pytest

from infra.storage import MediaStore, checked_key


@pytest.mark.parametrize(
    "key", ["42/0b6f1f4e-6d3e-4c1a-9a51-3f1b2c4d5e6f", "1/a", "company_7/file.v2-final=1", "x"]
)
def test_plain_paths_are_keys(key: str) -> None:
    assert checked_key(key) == key


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/abs",
        "42/",
        "42//x",
        "..",
        "42/../x",
        "42/./x",
        ".hidden",
        "42/x#1",  # the disk store's staging files are named so
        "a\\b",
        "a b",
        "a\nb",
        "%2e%2e/x",
        "é/x",
        "x" * 513,
    ],
)
def test_anything_else_is_refused(key: str) -> None:
    with pytest.raises(ValueError):
        checked_key(key)


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/media",
        "media",
        "file://otherhost/srv/media",
        "s3:///prefix",
        "gs://bucket",
    ],
)
def test_urls_that_name_no_store_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        MediaStore.from_url(url)


def test_s3_credentials_come_in_pairs() -> None:
    with pytest.raises(ValueError):
        MediaStore.from_url("s3://bucket", access_key_id="only-the-id")
    with pytest.raises(ValueError):
        MediaStore.from_url("s3://bucket", secret_access_key="only-the-secret")


def test_an_s3_store_says_where_it_is_without_its_secret() -> None:
    store = MediaStore.from_url(
        "s3://media-bucket/tenants/",
        endpoint="http://127.0.0.1:9000",
        access_key_id="id",
        secret_access_key="very-secret",
    )
    assert store.kind == "s3"
    assert store.location == "s3://media-bucket/tenants at http://127.0.0.1:9000"
    assert "very-secret" not in repr(store)


def test_parts_below_s3s_smallest_are_refused() -> None:
    with pytest.raises(ValueError):
        MediaStore.from_url("s3://bucket", part_bytes=1024 * 1024)
