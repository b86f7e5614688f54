"""What the daemon declares on the broker, checked on the real broker (issue 15 §1).

RabbitMQ 4.3 denies, by default, queues that are neither durable nor exclusive
(``transient_nonexcl_queues``), ``basic.qos`` with ``global=true`` (``global_qos``), the
``x-queue-master-locator`` argument, and (CQv1 removed) ``x-queue-mode`` / ``x-queue-version=1``.
The broker here is 3.10, which allows all of that, so these tests read back what was declared
(``rabbitmqctl list_queues`` / ``list_channels`` in a private vhost) and check it against those rules,
rather than relying on the broker to refuse.

A queue of the per-pod name left with other properties (the Go service's per-pod queue is durable with
no arguments) makes the broker answer 406 PRECONDITION_FAILED: the daemon must stop with status 2 and
one line naming the queue and the differing argument, not retry for ever.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import uuid
from typing import Any

import aio_pika
import pytest
import trio
import trio_asyncio

from tests.amqp_vhost import private_vhost
from tests.fakes.daemon_process import daemon_env
from tests.services import require_rabbitmq
from tts_streamer.adapters.amqp.bridge import TopologyConflict, open_amqp_bridge
from tts_streamer.supervisor.config import DaemonConfig
from tts_streamer.supervisor.daemon import topology

DENIED_ARGUMENTS = ("x-queue-mode", "x-queue-master-locator")


@pytest.fixture(autouse=True)
def _broker() -> None:
    require_rabbitmq()
    if shutil.which("rabbitmqctl") is None:
        message = "rabbitmqctl not found: these tests read the declarations from the broker's side"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def _vhost_of(url: str) -> str:
    return urllib.parse.unquote(url.rsplit("/", 1)[1]) or "/"


async def _rabbitmqctl(*args: str) -> list[list[str]]:
    """Rows of a ``rabbitmqctl list_*`` (tab-separated, no header)."""
    result = await trio.run_process(
        ["rabbitmqctl", "-q", "--no-table-headers", *args], capture_stdout=True, capture_stderr=True
    )
    return [line.split("\t") for line in result.stdout.decode().splitlines() if line.strip()]


def test_declarations_avoid_what_rabbitmq_4_3_denies() -> None:
    """The topology as data: no transient non-exclusive queue, no denied argument (both queues)."""
    for config in (DaemonConfig(pod_id="p1"), DaemonConfig(pod_id="p1", delay_exchange=True)):
        declared = topology(config)
        for queue in declared.consume:
            assert queue.durable, f"{queue.name} is transient and not exclusive"
            assert not set(queue.arguments or {}) & set(DENIED_ARGUMENTS)
        (pod_queue,) = [q for q in declared.consume if q.name == config.pod_queue]
        assert not pod_queue.auto_delete  # x-expires cleans it up; auto-delete would drop it at drain
        assert dict(pod_queue.arguments or {}) == {
            "x-expires": config.per_pod_queue_expires_ms,
            "x-message-ttl": config.per_pod_message_ttl_ms,
        }


async def test_declared_queues_and_qos_on_the_broker() -> None:
    config = DaemonConfig(pod_id=f"topo-{uuid.uuid4().hex[:8]}", per_pod_queue_expires_ms=600_000)
    with private_vhost() as url:
        vhost = _vhost_of(url)
        async with open_amqp_bridge(url, topology(config), broker_timeout=5) as bridge:
            assert bridge.connected
            queues = await _rabbitmqctl(
                "list_queues", "-p", vhost, "name", "durable", "auto_delete", "exclusive", "arguments"
            )
            channels = await _rabbitmqctl("list_channels", "vhost", "prefetch_count", "global_prefetch_count")
    by_name = {row[0]: row[1:] for row in queues}
    durable, auto_delete, exclusive, arguments = by_name[config.pod_queue]
    assert (durable, auto_delete, exclusive) == ("true", "false", "false")
    assert "x-expires" in arguments
    assert "600000" in arguments and "x-message-ttl" in arguments
    assert str(config.per_pod_message_ttl_ms) in arguments
    assert by_name[config.shared_queue][:3] == ["true", "false", "false"]
    assert by_name[config.shared_queue][3] in ("[]", "")
    for name, (durable, _auto_delete, exclusive, arguments) in by_name.items():
        # transient_nonexcl_queues: every queue is durable or exclusive (the reply queue is exclusive)
        assert durable == "true" or exclusive == "true", f"{name}: transient and not exclusive"
        assert not any(arg in arguments for arg in DENIED_ARGUMENTS), f"{name}: {arguments}"
    ours = [row for row in channels if row[0] == vhost]
    assert ours, "no channel of the bridge seen"
    assert all(row[2] == "0" for row in ours), f"global QoS set: {ours}"
    assert any(row[1] == str(config.amqp_prefetch) for row in ours)


async def _predeclare_go_queue(url: str, name: str, **flags: Any) -> None:
    """The Go service's per-pod queue: durable, no arguments (or whatever ``flags`` say)."""
    async with trio_asyncio.open_loop():
        connection = await trio_asyncio.aio_as_trio(aio_pika.connect)(url)
        try:
            channel = await trio_asyncio.aio_as_trio(connection.channel)()
            await trio_asyncio.aio_as_trio(channel.declare_queue)(name, **(flags or {"durable": True}))
        finally:
            await trio_asyncio.aio_as_trio(connection.close)()


async def test_leftover_go_per_pod_queue_is_a_clear_error_not_a_retry_loop() -> None:
    config = DaemonConfig(pod_id=f"topo-{uuid.uuid4().hex[:8]}")
    with private_vhost() as url:
        await _predeclare_go_queue(url, config.pod_queue)
        with trio.fail_after(15), pytest.raises(TopologyConflict) as raised:
            async with open_amqp_bridge(url, topology(config), broker_timeout=5):
                pytest.fail("the bridge came up against a conflicting queue")
    message = str(raised.value)
    assert config.pod_queue in message
    assert "PRECONDITION_FAILED" in message
    assert "inequivalent arg 'x-" in message  # the broker's text says which argument differs


async def test_serve_exits_2_with_one_line_naming_the_queue() -> None:
    pod_id = f"topo-{uuid.uuid4().hex[:8]}"
    queue = f"bin-manager.tts-manager.request.{pod_id}"
    workdir = tempfile.mkdtemp(prefix="tts-streamer-topo-")
    try:
        with private_vhost() as url:
            await _predeclare_go_queue(url, queue)
            env = daemon_env(url, pod_id, workdir, engine="espeak")
            with trio.fail_after(60):
                result = await trio.run_process(
                    [sys.executable, "-m", "tts_streamer.cli", "serve"],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("tts-streamer: bad configuration: RabbitMQ refused to declare queue")
    assert queue in last and "inequivalent arg" in last
    assert "Traceback" not in stderr
