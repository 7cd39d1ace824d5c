"""Comparing a secret a client sent with the one we expect, in constant time.

`hmac.compare_digest` raises TypeError for a str holding anything but ASCII, and HTTP header
values arrive as latin-1 text, so a client could turn a wrong signature or token into a 500. Here
both sides are compared as UTF-8 bytes: anything that is not the expected value is simply unequal.
"""

from __future__ import annotations

import hmac


def same_secret(given: str | bytes | None, expected: str | bytes) -> bool:
    """Whether `given` equals `expected`, in time that does not depend on where they differ."""
    if given is None:
        return False
    left = given.encode("utf-8", "surrogatepass") if isinstance(given, str) else given
    right = expected.encode("utf-8", "surrogatepass") if isinstance(expected, str) else expected
    return hmac.compare_digest(left, right)
