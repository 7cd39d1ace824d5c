"""Meta webhook envelopes: what ingest accepts, checked on the hot path without a model.

Only what the contract needs is checked (the shape that lets every entry and every change be
routed); everything else, unknown fields included, is passed through untouched.
"""

from __future__ import annotations

from typing import Any

WHATSAPP_OBJECT = "whatsapp_business_account"
MESSAGING_OBJECTS = frozenset({"page", "instagram"})

# Meta batches up to 1,000 updates per POST; more than that is not a Meta envelope.
MAX_UPDATES = 1000


class EnvelopeError(ValueError):
    """The body is JSON but not a Meta webhook envelope."""


def validate_envelope(doc: Any) -> int:
    """Raise EnvelopeError unless `doc` is a Meta envelope; return how many updates it holds."""
    if not isinstance(doc, dict):
        raise EnvelopeError("envelope must be a JSON object")
    obj = doc.get("object")
    if not isinstance(obj, str) or not obj:
        raise EnvelopeError("'object' must be a non-empty string")
    entries = doc.get("entry")
    if not isinstance(entries, list) or not entries:
        raise EnvelopeError("'entry' must be a non-empty array")
    updates = 0
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise EnvelopeError(f"entry[{i}] must be an object")
        if not isinstance(entry.get("id"), str | int):
            raise EnvelopeError(f"entry[{i}].id must be a string")
        changes = entry.get("changes")
        messaging = entry.get("messaging")
        if changes is None and messaging is None:
            raise EnvelopeError(f"entry[{i}] has neither 'changes' nor 'messaging'")
        if changes is not None:
            if not isinstance(changes, list):
                raise EnvelopeError(f"entry[{i}].changes must be an array")
            for j, change in enumerate(changes):
                if not isinstance(change, dict) or not isinstance(change.get("field"), str):
                    raise EnvelopeError(f"entry[{i}].changes[{j}].field must be a string")
                if not isinstance(change.get("value"), dict):
                    raise EnvelopeError(f"entry[{i}].changes[{j}].value must be an object")
            updates += len(changes)
        if messaging is not None:
            if not isinstance(messaging, list):
                raise EnvelopeError(f"entry[{i}].messaging must be an array")
            for j, event in enumerate(messaging):
                if not isinstance(event, dict):
                    raise EnvelopeError(f"entry[{i}].messaging[{j}] must be an object")
            updates += len(messaging)
    if updates == 0:
        raise EnvelopeError("envelope holds no change and no messaging event")
    if updates > MAX_UPDATES:
        raise EnvelopeError(f"envelope holds {updates} updates; Meta sends at most {MAX_UPDATES}")
    return updates
