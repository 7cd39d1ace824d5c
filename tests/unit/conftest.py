"""The fast tier: pure logic only. The session's services (embedded Postgres and Kafka, the
simulator and the Cortexx processes, tests/conftest.py) are refused here, so that a test needing
them fails at once with a reason instead of making the tier that runs first slow."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def services() -> None:
    pytest.fail(
        "tests/unit is the fast tier: no Postgres, Kafka, Java or child process; "
        "a test that needs the services belongs with the rest of the suite under tests/"
    )
