"""An AMQP test rig: real broker, Asterisk simulator on loopback, fake call-manager, daemon(s), a caller."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

import aio_pika
import attrs
import trio
import trio_asyncio

from tests.fakes.call_manager import FakeCallManager, open_fake_call_manager
from tests.fakes.daemon_process import DaemonProcess, open_daemon_process, synthetic_env
from tests.fakes.voipbin_client import SHARED_QUEUE, VoipbinCaller, open_voipbin_caller
from tests.services import RABBITMQ_URL
from tts_streamer.adapters.synthetic import SyntheticEngine
from tts_streamer.adapters.voice import VoiceEngine
from tts_streamer.adapters.voipbin.call_manager import CALL_MANAGER_QUEUE
from tts_streamer.adapters.voipbin.envelope import Response
from tts_streamer.simulator.asterisk import AsteriskSimulator, serve_asterisk_simulator
from tts_streamer.supervisor.config import DaemonConfig
from tts_streamer.supervisor.daemon import DaemonHandle, serve_daemon


async def purge_queues(*names: str) -> None:
    """Leftovers of an earlier run must not reach this one."""
    async with trio_asyncio.open_loop():
        connection = await trio_asyncio.aio_as_trio(aio_pika.connect)(RABBITMQ_URL)
        try:
            channel = await trio_asyncio.aio_as_trio(connection.channel)()
            for name in names:
                queue = await trio_asyncio.aio_as_trio(channel.declare_queue)(name, durable=True)
                await trio_asyncio.aio_as_trio(queue.purge)()
        finally:
            await trio_asyncio.aio_as_trio(connection.close)()


@attrs.define
class Rig:
    sim: AsteriskSimulator
    call_manager: FakeCallManager
    caller: VoipbinCaller
    daemons: list[DaemonHandle]
    engine: SyntheticEngine
    workdir: str = ""  # per-rig files: the default SQLite speaking store, the speech media directory
    child: DaemonProcess | None = None  # the daemon, when it runs in a process of its own

    @property
    def daemon(self) -> DaemonHandle:
        return self.daemons[0]

    def pod_queue(self, index: int = 0) -> str:
        if self.child is not None and index == 0:
            return self.child.pod_queue
        return self.daemons[index].config.pod_queue

    async def create(self, data: dict[str, Any] | None = None) -> Response:
        body = data or {
            "customer_id": str(uuid.uuid4()),
            "reference_type": "call",
            "reference_id": str(uuid.uuid4()),
            "language": "en-US",
            "gender": "female",
            "direction": "out",
        }
        response = await self.caller.call(SHARED_QUEUE, "/v1/streamings", "POST", body)
        assert response is not None, "no reply to create"
        return response

    async def streaming(self, sid: str, action: str, data: Any = None, *, pod: int = 0) -> Response:
        response = await self.caller.call(self.pod_queue(pod), f"/v1/streamings/{sid}/{action}", "POST", data)
        assert response is not None, f"no reply to {action}"
        return response

    def sim_call_for(self, sid: str) -> Any:
        return self.sim.calls[self.call_manager.created[uuid.UUID(sid)]]

    async def request(self, queue: str, uri: str, method: str, data: Any = None) -> Response:
        """Any request, as a voipbin service sends it; asserts that a reply came."""
        response = await self.caller.call(queue, uri, method, data)
        assert response is not None, f"no reply to {method} {uri}"
        return response

    async def speaking(self, sid: str, action: str, data: Any = None, *, pod: int = 0) -> Response:
        """POST /v1/speakings/<id>/<action> on a pod's queue (say, flush, stop)."""
        return await self.request(self.pod_queue(pod), f"/v1/speakings/{sid}/{action}", "POST", data)


def _rig_files(workdir: str) -> dict[str, Any]:
    """Speakings/speeches settings that keep a test daemon off the user's files and fixed ports."""
    return {
        "sqlite_path": os.path.join(workdir, "speakings.sqlite3"),
        "media_dir": os.path.join(workdir, "media"),
        "media_http_host": "127.0.0.1",
        "media_http_port": 0,
    }


def open_child_daemon(
    url: str, caller: VoipbinCaller, engine: SyntheticEngine, env: dict[str, str] | None = None
) -> AbstractAsyncContextManager[DaemonProcess]:
    """A daemon process on ``url`` whose synthetic voice speaks at ``engine``'s pace (``env``: more of
    its environment)."""
    full_env = synthetic_env(engine.seconds_per_char, engine.speed) | (env or {})
    return open_daemon_process(url, caller, env=full_env)


@asynccontextmanager
async def open_rig(
    *,
    pods: int = 1,
    engine: SyntheticEngine | None = None,
    child: bool = False,
    child_env: dict[str, str] | None = None,
    **config: Any,
) -> AsyncIterator[Rig]:
    """``pods`` daemons in this process; or, with ``child``, one daemon in a process of its own
    (``rig.child``; its voice is ``engine``'s pace, ``child_env`` added to its environment, ``config``
    does not apply) and none in this one."""
    assert not (child and config), "a child daemon takes its configuration from the environment"
    await purge_queues(SHARED_QUEUE, CALL_MANAGER_QUEUE)
    engine = engine or SyntheticEngine(seconds_per_char=0.05, speed=4.0)
    sim = AsteriskSimulator(seed=1)
    workdir = tempfile.mkdtemp(prefix="tts-streamer-rig-")
    stack_files = AsyncExitStack()
    stack_files.callback(shutil.rmtree, workdir, ignore_errors=True)
    async with stack_files, trio.open_nursery() as nursery, AsyncExitStack() as stack:
        port = await nursery.start(serve_asterisk_simulator, sim, "127.0.0.1", 0)
        call_manager = await stack.enter_async_context(
            open_fake_call_manager(RABBITMQ_URL, sim, "127.0.0.1", port)
        )
        caller = await stack.enter_async_context(open_voipbin_caller(RABBITMQ_URL))
        daemons = []
        finished: list[trio.Event] = []

        async def run_one(config: DaemonConfig, done: trio.Event, *, task_status: Any) -> None:
            try:
                await serve_daemon(
                    config, engines={engine.name: engine}, handle_signals=False, task_status=task_status
                )
            finally:
                done.set()

        child_daemon = None
        if child:
            child_daemon = await stack.enter_async_context(
                open_child_daemon(RABBITMQ_URL, caller, engine, child_env)
            )
            pods = 0
        for index in range(pods):
            pod_id = f"test-pod-{index}-{uuid.uuid4().hex[:6]}"
            options: dict[str, Any] = {
                "drain_timeout": 5.0,
                "http_host": "127.0.0.1",
                "http_port": 0,
                "admin_socket": os.path.join(tempfile.gettempdir(), f"tts-streamer-test-{pod_id}.sock"),
                **_rig_files(workdir),
            }
            options.update(config)
            daemon_config = DaemonConfig(
                rabbitmq_address=RABBITMQ_URL, pod_id=pod_id, default_engine=engine.name, **options
            )
            finished.append(trio.Event())
            daemons.append(await nursery.start(run_one, daemon_config, finished[-1]))
        try:
            yield Rig(sim, call_manager, caller, daemons, engine, workdir, child_daemon)
        finally:
            for handle in daemons:
                handle.shutdown()
            with trio.move_on_after(10):
                for done in finished:
                    await done.wait()
            nursery.cancel_scope.cancel()


@attrs.define
class Pod:
    """A daemon started by ``run_pod``; ``crash()`` kills it with no drain, like a killed process."""

    handle: DaemonHandle
    scope: trio.CancelScope
    done: trio.Event

    def crash(self) -> None:
        self.scope.cancel()

    async def wait_stopped(self) -> None:
        with trio.fail_after(10):
            await self.done.wait()


@asynccontextmanager
async def run_pod(
    rig: Rig,
    pod_id: str | None = None,
    *,
    engines: Mapping[str, VoiceEngine] | None = None,
    **config: Any,
) -> AsyncIterator[Pod]:
    """One more daemon on ``rig`` (appended to ``rig.daemons`` while it runs), with a chosen pod id,
    engines and config; shut down on exit unless it was crashed."""
    pod_id = pod_id or f"test-pod-x-{uuid.uuid4().hex[:6]}"
    engines = dict(engines) if engines is not None else {rig.engine.name: rig.engine}
    options: dict[str, Any] = {
        "drain_timeout": 5.0,
        "http_host": "127.0.0.1",
        "http_port": 0,
        "admin_socket": os.path.join(tempfile.gettempdir(), f"tts-streamer-test-{pod_id}.sock"),
        "default_engine": rig.engine.name if rig.engine.name in engines else next(iter(engines)),
        **_rig_files(rig.workdir),
    }
    options.update(config)
    daemon_config = DaemonConfig(rabbitmq_address=RABBITMQ_URL, pod_id=pod_id, **options)
    scope, done = trio.CancelScope(), trio.Event()

    async def run(*, task_status: Any) -> None:
        with scope:
            try:
                await serve_daemon(
                    daemon_config, engines=engines, handle_signals=False, task_status=task_status
                )
            finally:
                done.set()

    async with trio.open_nursery() as nursery:
        handle: DaemonHandle = await nursery.start(run)
        rig.daemons.append(handle)
        pod = Pod(handle, scope, done)
        try:
            yield pod
        finally:
            rig.daemons.remove(handle)
            if not scope.cancel_called:
                handle.shutdown()
                with trio.move_on_after(10):
                    await done.wait()
            scope.cancel()
