"""A private RabbitMQ vhost per test module, so concurrent runs on one broker cannot steal each other's
requests (every rig consumes the same shared queue and the same call-manager queue).

``private_amqp_url`` creates ``tts-test-<random>`` with ``rabbitmqctl`` and points ``open_rig`` at it;
where ``rabbitmqctl`` cannot be used it falls back to the default vhost (isolation is then lost, not
correctness).
"""

from __future__ import annotations

import logging
import subprocess
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

import tests.amqp_support
from tests.services import RABBITMQ_URL, _reachable

log = logging.getLogger(__name__)


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=30)


def url_for_vhost(vhost: str) -> str:
    base = RABBITMQ_URL.rstrip("/")
    if base.count("/") > 2:  # the configured URL names a vhost already: replace it
        base = base.rsplit("/", 1)[0]
    return f"{base}/{urllib.parse.quote(vhost, safe='')}"


@contextmanager
def private_vhost() -> Iterator[str]:
    """Yield the URL of a fresh vhost (deleted afterwards), or the default URL if that is impossible."""
    if not _reachable("127.0.0.1", 5672):
        yield RABBITMQ_URL
        return
    name = f"tts-test-{uuid.uuid4().hex[:10]}"
    try:
        _rabbitmqctl("add_vhost", name)
        _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("no private vhost (%s): using the default one", exc)
        yield RABBITMQ_URL
        return
    try:
        yield url_for_vhost(name)
    finally:
        try:
            _rabbitmqctl("delete_vhost", name)
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("vhost %s not deleted: %s", name, exc)


@pytest.fixture(scope="module")
def private_amqp_url() -> Iterator[str]:
    """A private vhost for this module; ``open_rig`` (sim, fake call-manager, caller, daemons) uses it."""
    with private_vhost() as url, pytest.MonkeyPatch.context() as patch:
        patch.setattr(tests.amqp_support, "RABBITMQ_URL", url)
        yield url
