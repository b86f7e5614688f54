"""Real services the suite uses: skip with a reason when unreachable, fail under CI=true."""

from __future__ import annotations

import os
import socket

import pytest

RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_ADDRESS", "amqp://guest:guest@127.0.0.1:5672/")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int, how_to_start: str) -> None:
    if _reachable(host, port):
        return
    message = f"{name} not reachable at {host}:{port} (start it with: {how_to_start})"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def require_rabbitmq() -> None:
    require_service("RabbitMQ", "127.0.0.1", 5672, "rabbitmq-server -detached")


# MariaDB for the speaking store (database ``test``); override with a SQLAlchemy URL or a Go DSN.
MARIADB_DSN = os.environ.get("TEST_DATABASE_DSN", "mysql+pymysql://root@127.0.0.1:3306/test")


def require_mariadb() -> None:
    require_service("MariaDB", "127.0.0.1", 3306, "service mariadb start")
