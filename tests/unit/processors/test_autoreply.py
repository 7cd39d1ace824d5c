"""Auto-replies judged on the company's own wall clock: business hours and the away message's
once-a-day window, across daylight-saving changes (the missing spring hour, the repeated autumn
hour, Brazil's old midnight switch), local weekdays and hours that run past midnight."""

from __future__ import annotations

import types
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from infra.runtime import ttl_cache
from processors.autoreply import Company, CompanyCache, auto_replies_due, is_open
from tests.unit.strategies import fast

AWAY = "We are closed, back tomorrow."
WELCOME = "Welcome! An agent will answer soon."
WEEKDAYS_9_TO_18 = {day: ["09:00", "18:00"] for day in ("mon", "tue", "wed", "thu", "fri")}


def company(
    hours: dict[str, Any] | None,
    tz: str = "Europe/Berlin",
    *,
    away: str | None = AWAY,
    welcome: str | None = WELCOME,
) -> Company:
    return Company(
        id=7,
        slug="acme",
        wuzapi_token="tok",
        welcome_message=welcome,
        away_message=away,
        timezone=tz,
        business_hours=hours,
    )


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# --------------------------------------------------------------------------- business hours


@pytest.mark.parametrize(
    ("at", "open_"),
    [
        # Friday before the switch (CET, UTC+1): 09:00 local is 08:00 UTC.
        ("2024-03-29T07:59", False),
        ("2024-03-29T08:00", True),
        ("2024-03-29T16:59", True),
        ("2024-03-29T17:00", False),
        # Monday after it (CEST, UTC+2): 09:00 local is 07:00 UTC, an hour earlier in UTC.
        ("2024-04-01T06:59", False),
        ("2024-04-01T07:00", True),
        ("2024-04-01T15:59", True),
        ("2024-04-01T16:00", False),
    ],
)
def test_berlin_office_hours_stay_on_the_local_clock_when_summer_time_starts(at: str, open_: bool) -> None:
    assert is_open(company(WEEKDAYS_9_TO_18), utc(at)) is open_


@pytest.mark.parametrize(
    ("at", "open_"),
    [
        ("2024-03-31T00:59", False),  # 01:59 CET: before the span
        ("2024-03-31T01:00", True),  # 03:00 CEST: the clock jumped over 02:30, the span has begun
        ("2024-03-31T01:29", True),  # 03:29 CEST
        ("2024-03-31T01:30", False),  # 03:30 CEST: closed
    ],
)
def test_hours_opening_inside_the_missing_spring_hour_begin_when_the_clock_lands(
    at: str, open_: bool
) -> None:
    # Europe/Berlin skips 02:00-03:00 on 2024-03-31; a span opening at 02:30 opens at 03:00.
    assert is_open(company({"sun": ["02:30", "03:30"]}), utc(at)) is open_


@pytest.mark.parametrize(
    ("at", "open_"),
    [
        ("2024-03-10T05:59", False),  # 00:59 EST
        ("2024-03-10T06:00", True),  # 01:00 EST
        ("2024-03-10T06:59", True),  # 01:59 EST
        ("2024-03-10T07:00", False),  # 03:00 EDT: 02:00-03:00 never happened, the span is over
    ],
)
def test_new_york_span_across_the_spring_gap_lasts_one_real_hour(at: str, open_: bool) -> None:
    assert is_open(company({"sun": ["01:00", "03:00"]}, "America/New_York"), utc(at)) is open_


@pytest.mark.parametrize(
    ("at", "open_"),
    [
        ("2024-10-26T23:59", False),  # 01:59 CEST
        ("2024-10-27T00:00", True),  # 02:00 CEST, the first time
        ("2024-10-27T00:59", True),
        ("2024-10-27T01:00", True),  # 02:00 CET, the second time
        ("2024-10-27T01:59", True),
        ("2024-10-27T02:00", False),  # 03:00 CET
    ],
)
def test_the_repeated_autumn_hour_is_open_both_times_in_berlin(at: str, open_: bool) -> None:
    assert is_open(company({"sun": ["02:00", "03:00"]}), utc(at)) is open_


@pytest.mark.parametrize(
    ("at", "open_"),
    [
        ("2024-11-03T04:59", False),  # 00:59 EDT
        ("2024-11-03T05:30", True),  # 01:30 EDT
        ("2024-11-03T06:30", True),  # 01:30 EST, an hour later in real time
        ("2024-11-03T07:00", False),  # 02:00 EST
    ],
)
def test_the_repeated_autumn_hour_is_open_both_times_in_new_york(at: str, open_: bool) -> None:
    assert is_open(company({"sun": ["01:00", "02:00"]}, "America/New_York"), utc(at)) is open_


def test_the_weekday_is_the_local_one_not_utcs() -> None:
    friday_evening = company({"fri": ["20:00", "23:00"]}, "America/New_York")
    # Saturday 02:30 UTC is Friday 22:30 in New York (EDT).
    assert is_open(friday_evening, utc("2024-06-08T02:30"))
    # Friday 22:30 UTC is Friday 18:30 in New York: not yet open.
    assert not is_open(friday_evening, utc("2024-06-07T22:30"))


def test_a_day_can_close_at_24_00() -> None:
    late = company({"fri": ["18:00", "24:00"]})
    assert is_open(late, utc("2024-06-07T21:59"))  # Friday 23:59 CEST
    assert not is_open(late, utc("2024-06-07T22:00"))  # Saturday 00:00 CEST: Saturday is not listed


def test_overnight_hours_written_as_two_days_cover_the_whole_night() -> None:
    night = company({"fri": ["22:00", "24:00"], "sat": ["00:00", "02:00"]})
    assert not is_open(night, utc("2024-06-07T19:59"))  # Friday 21:59
    assert is_open(night, utc("2024-06-07T21:00"))  # Friday 23:00
    assert is_open(night, utc("2024-06-07T23:30"))  # Saturday 01:30
    assert not is_open(night, utc("2024-06-08T00:00"))  # Saturday 02:00


@pytest.mark.parametrize("at", ["2024-06-07T21:00", "2024-06-07T23:30"], ids=["fri-23h00", "sat-01h30"])
def test_a_span_that_runs_past_midnight_is_open_until_it_closes(at: str) -> None:
    assert is_open(company({"fri": ["22:00", "02:00"]}), utc(at))


@pytest.mark.parametrize("at", ["2024-06-07T19:59", "2024-06-08T00:00"], ids=["fri-21h59", "sat-02h00"])
def test_a_span_that_runs_past_midnight_is_closed_outside_it(at: str) -> None:
    assert not is_open(company({"fri": ["22:00", "02:00"]}), utc(at))


@pytest.mark.parametrize(
    "span",
    [None, [], ["09:00"], ["09:00", "12:00", "18:00"], "09:00-18:00", {"open": "09:00"}],
    ids=["null", "empty", "one-time", "three-times", "string", "object"],
)
def test_a_malformed_day_is_closed_not_an_error(span: Any) -> None:
    assert not is_open(company({"mon": span}), utc("2024-06-03T10:00"))  # Monday 12:00 CEST


def test_no_business_hours_means_always_open_and_an_empty_week_always_closed() -> None:
    assert is_open(company(None), utc("2024-06-09T03:00"))
    assert not is_open(company({}), utc("2024-06-05T10:00"))


def test_an_unknown_time_zone_is_judged_in_utc() -> None:
    typo = company({"mon": ["09:00", "18:00"]}, "Europe/Berlinn")
    assert is_open(typo, utc("2024-06-03T17:30"))  # 17:30 UTC, 19:30 in Berlin
    assert not is_open(typo, utc("2024-06-03T08:30"))  # 08:30 UTC, 10:30 in Berlin


ZONES = ["Europe/Berlin", "America/New_York", "America/Sao_Paulo", "Asia/Kolkata", "UTC"]


@fast(200)
@given(
    at=st.datetimes(min_value=datetime(2015, 1, 1), max_value=datetime(2030, 12, 31), timezones=st.just(UTC)),
    tz=st.sampled_from(ZONES),
)
def test_open_exactly_while_the_local_clock_reads_between_the_days_hours(at: datetime, tz: str) -> None:
    hours = {"mon": ["08:30", "12:00"], "tue": ["00:00", "24:00"], "sat": ["10:15", "10:45"]}
    local = at.astimezone(ZoneInfo(tz))
    minute = local.hour * 60 + local.minute
    expected = {
        0: 8 * 60 + 30 <= minute < 12 * 60,
        1: True,
        5: 10 * 60 + 15 <= minute < 10 * 60 + 45,
    }.get(local.weekday(), False)
    assert is_open(company(hours, tz), at) is expected


# --------------------------------------------------------------------------- which reply is due


def test_a_new_conversation_in_hours_gets_the_welcome_once_per_conversation() -> None:
    assert auto_replies_due(company(WEEKDAYS_9_TO_18), utc("2024-06-03T10:00"), new_conversation=True) == [
        ("welcome", "conversation", WELCOME)
    ]


def test_a_returning_customer_in_hours_gets_no_auto_reply() -> None:
    assert auto_replies_due(company(WEEKDAYS_9_TO_18), utc("2024-06-03T10:00"), new_conversation=False) == []


def test_a_new_conversation_out_of_hours_gets_the_away_message_only() -> None:
    due = auto_replies_due(company(WEEKDAYS_9_TO_18), utc("2024-06-03T20:00"), new_conversation=True)
    assert due == [("away", "2024-06-03", AWAY)]


def test_without_an_away_message_a_closed_company_still_welcomes() -> None:
    shop = company(WEEKDAYS_9_TO_18, away=None)
    assert auto_replies_due(shop, utc("2024-06-03T20:00"), new_conversation=True) == [
        ("welcome", "conversation", WELCOME)
    ]
    assert auto_replies_due(shop, utc("2024-06-03T20:00"), new_conversation=False) == []


def test_a_company_without_hours_never_sends_the_away_message() -> None:
    assert auto_replies_due(company(None), utc("2024-06-09T03:00"), new_conversation=False) == []


def test_a_company_without_messages_sends_nothing() -> None:
    shop = company({}, away=None, welcome=None)
    assert auto_replies_due(shop, utc("2024-06-09T03:00"), new_conversation=True) == []


def away_key(tz: str, at: str) -> str:
    due = auto_replies_due(company({}, tz), utc(at), new_conversation=False)
    assert [kind for kind, _, _ in due] == ["away"]
    return due[0][1]


def test_the_away_window_is_the_local_day_not_the_utc_day() -> None:
    # Friday 23:30 in New York is already Saturday in UTC.
    assert away_key("America/New_York", "2024-03-09T04:30") == "2024-03-08"
    assert away_key("America/New_York", "2024-03-09T05:00") == "2024-03-09"  # midnight EST


def test_berlins_25_hour_autumn_day_is_one_away_window() -> None:
    assert away_key("Europe/Berlin", "2024-10-26T21:59") == "2024-10-26"  # Saturday 23:59 CEST
    first, last = "2024-10-26T22:00", "2024-10-27T22:59"  # Sunday 00:00 CEST .. 23:59 CET
    assert away_key("Europe/Berlin", first) == away_key("Europe/Berlin", last) == "2024-10-27"
    assert away_key("Europe/Berlin", "2024-10-27T23:00") == "2024-10-28"


def test_sao_paulos_repeated_late_evening_hour_answers_once() -> None:
    # 2019-02-17 00:00 -02 fell back to 2019-02-16 23:00 -03: 23:30 happened twice.
    assert away_key("America/Sao_Paulo", "2019-02-17T01:30") == "2019-02-16"
    assert away_key("America/Sao_Paulo", "2019-02-17T02:30") == "2019-02-16"
    assert away_key("America/Sao_Paulo", "2019-02-17T03:00") == "2019-02-17"


def test_sao_paulos_day_without_a_midnight_starts_at_one() -> None:
    # On 2018-11-04 the clocks went from 23:59:59 -03 straight to 01:00 -02.
    assert away_key("America/Sao_Paulo", "2018-11-04T02:59") == "2018-11-03"
    assert away_key("America/Sao_Paulo", "2018-11-04T03:00") == "2018-11-04"


# --------------------------------------------------------------------------- the company cache


def test_a_cached_company_is_served_until_its_ttl_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    # Only the cache's view of `time` is replaced: the event loop keeps the real clock.
    monkeypatch.setattr(ttl_cache, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    cache = CompanyCache(ttl_s=30.0)
    assert cache.get("acme") is None
    cache.put(company(None))
    clock[0] = 129.0
    cached = cache.get("acme")
    assert cached is not None and cached.slug == "acme"
    clock[0] = 130.5
    assert cache.get("acme") is None  # stale: the store reads the settings again
    cache.put(company({}, away="Changed"))
    refreshed = cache.get("acme")
    assert refreshed is not None and refreshed.away_message == "Changed"
