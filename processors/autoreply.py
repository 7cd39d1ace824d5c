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


def is_open(company: Company, at: datetime) -> bool:
    hours = company.business_hours
    if hours is None:
        return True
    local = at.astimezone(_zone(company.timezone))
    span = hours.get(DAYS[local.weekday()])
    if not isinstance(span, list | tuple) or len(span) != 2:
        return False
    now = local.strftime("%H:%M")
    return str(span[0]) <= now < str(span[1])


def auto_replies_due(company: Company, at: datetime, *, new_conversation: bool) -> list[tuple[str, str, str]]:
    """(kind, window key, text) of each auto-reply an inbound message at `at` calls for."""
    if company.away_message and not is_open(company, at):
        # Outside hours the away message answers, a new conversation included: one reply, not two.
        local_day = at.astimezone(_zone(company.timezone)).date().isoformat()
        return [("away", local_day, company.away_message)]
    if new_conversation and company.welcome_message:
        return [("welcome", "conversation", company.welcome_message)]
    return []
