"""A conversation's (and a notification's) preview of a message: the worker writes it for inbound
messages, the read API for an agent's reply; both must clip the same way."""

from __future__ import annotations

from typing import Any

PREVIEW_MAX = 200


def clip(text: Any) -> str | None:
    """The preview of a message body: at most PREVIEW_MAX characters, an ellipsis if cut."""
    if text is None:
        return None
    out = str(text)
    return out if len(out) <= PREVIEW_MAX else out[: PREVIEW_MAX - 1] + "\u2026"
