"""The one retry helper: waits out what it is told to, raises anything else at once."""

from __future__ import annotations

import pytest

from infra.runtime.retry import until_it_passes


class Outage(Exception):
    pass


async def test_an_outage_is_waited_out_until_the_call_passes() -> None:
    calls = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise Outage
        return "done"

    result = await until_it_passes(
        flaky, retry_if=lambda e: isinstance(e, Outage), event="test.retry", initial_s=0.001, max_s=0.002
    )
    assert result == "done" and len(calls) == 3


async def test_any_other_error_is_raised_at_once() -> None:
    calls = []

    async def broken() -> None:
        calls.append(1)
        raise ValueError("poison")

    with pytest.raises(ValueError):
        await until_it_passes(broken, retry_if=lambda e: isinstance(e, Outage), event="test.retry")
    assert len(calls) == 1
