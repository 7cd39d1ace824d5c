"""One Kafka version everywhere: the embedded broker's Maven project, the compose file and the
testcontainers path run the same engine."""

from __future__ import annotations

import re
from pathlib import Path

from harness.embedded import kafka_version
from tests.containers import KAFKA_IMAGE

ROOT = Path(__file__).resolve().parent.parent


def test_compose_and_containers_run_the_embedded_brokers_version() -> None:
    version = kafka_version()
    compose = (ROOT / "infra" / "compose.yaml").read_text()
    assert re.findall(r"image: apache/kafka:(\S+)", compose) == [version]
    assert f"apache/kafka:{version}" == KAFKA_IMAGE
