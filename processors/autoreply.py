"""Auto-replies: which are due for an inbound message, judged in the company's own time zone.

A welcome goes to a conversation's first message; an away message answers a message that
arrives outside business hours, once per local day. The store writes one `auto_replies` row per
(conversation, kind, window) under a unique key, so a redelivered webhook never answers twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from infra.runtime.ttl_cache import TtlCache

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True, slots=True)
class Company:
    id: int
    slug: str
    wuzapi_token: str | None
    welcome_message: str | None
    away_message: str | None
    timezone: str
    # {"mon": ["09:00", "18:00"], ...}; a day not listed is closed; None means always open.
    business_hours: dict[str, Any] | None


class CompanyCache:
    """Company settings by slug, refreshed after `ttl_s` so a changed setting is picked up."""

    def __init__(self, ttl_s: float = 30.0) -> None:
        self._entries: TtlCache[str, Company] = TtlCache(ttl_s=ttl_s)

    def get(self, slug: str) -> Company | None:
        return self._entries.get(slug)

    def put(self, company: Company) -> None:
        self._entries.put(company.slug, company)


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def _minutes(value: object) -> int | None:
    """'HH:MM' (or 'H:MM') as minutes since midnight, '24:00' included; None if it is not one."""
    hours, sep, minutes = str(value).partition(":")
    if not sep or not hours.isdigit() or not minutes.isdigit() or len(minutes) != 2:
        return None
    total = int(hours) * 60 + int(minutes)
    return total if int(minutes) < 60 and total <= 24 * 60 else None


def _span(hours: dict[str, Any], day: str) -> tuple[int, int] | None:
    span = hours.get(day)
    if not isinstance(span, list | tuple) or len(span) != 2:
        return None
    start, end = _minutes(span[0]), _minutes(span[1])
    return None if start is None or end is None else (start, end)


def is_open(company: Company, at: datetime) -> bool:
    """Whether `at` falls in the company's hours, in its time zone. A day's span whose closing time
    is before its opening time runs past midnight (fri 22:00-02:00: open until Saturday 02:00)."""
    hours = company.business_hours
    if hours is None:
        return True
    local = at.astimezone(_zone(company.timezone))
    now = local.hour * 60 + local.minute
    today = _span(hours, DAYS[local.weekday()])
    if today is not None:
        start, end = today
        if start <= now < end or (end < start and now >= start):
            return True
    yesterday = _span(hours, DAYS[(local.weekday() - 1) % 7])
    if yesterday is not None:
        start, end = yesterday
        if end < start and now < end:
            return True
    return False


def auto_replies_due(company: Company, at: datetime, *, new_conversation: bool) -> list[tuple[str, str, str]]:
    """(kind, window key, text) of each auto-reply an inbound message at `at` calls for."""
    if company.away_message and not is_open(company, at):
        # Outside hours the away message answers, a new conversation included: one reply, not two.
        local_day = at.astimezone(_zone(company.timezone)).date().isoformat()
        return [("away", local_day, company.away_message)]
    if new_conversation and company.welcome_message:
        return [("welcome", "conversation", company.welcome_message)]
    return []
