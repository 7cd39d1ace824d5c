"""Kafka (KRaft) and Postgres from testcontainers, for `CORTEXX_TEST_SERVICES=containers`.

Used only when a Docker engine answers; otherwise the session skips and says why. The build
machines run no Docker engine, so this path is written and type-checked, not exercised there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from harness.embedded import free_port, kafka_version

# The same Apache Kafka as the embedded broker and infra/compose.yaml (tests/test_kafka_version.py).
KAFKA_IMAGE = f"apache/kafka:{kafka_version()}"
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
    """Start Apache Kafka (KRaft, one node) and Postgres for the session; stop both after.

    Kafka is the official image on a fixed host port, so the address it advertises is known
    before it starts (testcontainers' KafkaContainer drives Confluent's images only).
    """
    from testcontainers.community.postgres import PostgresContainer
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    with contextlib.ExitStack() as stack:
        postgres = stack.enter_context(
            PostgresContainer(
                POSTGRES_IMAGE, username="cortexx", password="cortexx", dbname="cortexx", driver=None
            )
        )
        port = free_port()
        kafka = DockerContainer(KAFKA_IMAGE).with_bind_ports(9092, port)
        for name, value in {
            "KAFKA_NODE_ID": "1",
            "KAFKA_PROCESS_ROLES": "broker,controller",
            "KAFKA_LISTENERS": "PLAINTEXT://:9092,CONTROLLER://:9093",
            "KAFKA_ADVERTISED_LISTENERS": f"PLAINTEXT://127.0.0.1:{port}",
            "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
            "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9093",
            "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
            "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
            "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
            "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
            "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
        }.items():
            kafka.with_env(name, value)
        stack.enter_context(kafka)
        wait_for_logs(kafka, "Kafka Server started", timeout=120)
        yield ContainerUrls(
            database_url=postgres.get_connection_url(driver=None),
            kafka_bootstrap=f"127.0.0.1:{port}",
        )
