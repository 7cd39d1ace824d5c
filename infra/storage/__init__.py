"""Where media is kept: one interface (`MediaStore`) over the local disk and S3-compatible stores
(infra/storage/store.py)."""

from infra.storage.store import (
    CHUNK_BYTES,
    PART_BYTES,
    PART_CONCURRENCY,
    MediaNotFound,
    MediaStore,
    RangeNotSatisfiable,
    StoredObject,
    StoreError,
    StoreUnavailable,
    checked_key,
)

__all__ = [
    "CHUNK_BYTES",
    "PART_BYTES",
    "PART_CONCURRENCY",
    "MediaNotFound",
    "MediaStore",
    "RangeNotSatisfiable",
    "StoreError",
    "StoreUnavailable",
    "StoredObject",
    "checked_key",
]
