"""Kafka (KRaft) and Postgres from testcontainers, for `CORTEXX_TEST_SERVICES=containers`.

Used only when a Docker engine answers; otherwise the session skips and says why. The build
machines run no Docker engine, so this path is written and type-checked, not exercised there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

KAFKA_IMAGE = "confluentinc/cp-kafka:7.6.0"  # KRaft needs 7.0 or later
POSTGRES_IMAGE = "postgres:17"


class NoDockerEngine(RuntimeError):
    """`CORTEXX_TEST_SERVICES=containers`, but no Docker engine answers."""


@dataclass(frozen=True, slots=True)
class ContainerUrls:
    database_url: str
    kafka_bootstrap: str


def docker_answers() -> None:
    """Raise NoDockerEngine with the reason unless a Docker engine answers a ping."""
    try:
        import docker  # the Docker SDK that testcontainers uses

        docker.from_env(timeout=5).ping()
    except Exception as exc:  # any failure here means the same thing: no engine to use
        raise NoDockerEngine(f"{type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def kafka_and_postgres() -> Iterator[ContainerUrls]:
    """Start Apache Kafka (KRaft, one broker) and Postgres for the session; stop both after."""
    from testcontainers.community.kafka import KafkaContainer
    from testcontainers.community.postgres import PostgresContainer

    with contextlib.ExitStack() as stack:
        postgres = stack.enter_context(
            PostgresContainer(
                POSTGRES_IMAGE, username="cortexx", password="cortexx", dbname="cortexx", driver=None
            )
        )
        kafka = stack.enter_context(KafkaContainer(KAFKA_IMAGE).with_kraft())
        yield ContainerUrls(
            database_url=postgres.get_connection_url(driver=None),
            kafka_bootstrap=kafka.get_bootstrap_server(),
        )
