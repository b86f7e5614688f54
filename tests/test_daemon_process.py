"""``tts-streamer serve`` as a real process: configuration from the environment, a create answered
through the broker, and SIGTERM drained through the normal path with exit status 0.

The simulator, the fake call-manager and the Go-style caller run in the test process (open_rig with no
pods of its own) in a private vhost; the daemon process gets that vhost's address.
"""

from __future__ import annotations

import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.amqp_support import Rig, open_rig
from tests.amqp_vhost import private_amqp_url
from tests.fakes.call_manager import FakeCallManager
from tests.fakes.daemon_process import daemon_command, daemon_env
from tests.fakes.voipbin_client import SHARED_QUEUE
from tests.services import require_rabbitmq
from tts_streamer.adapters.voipbin import envelope as wire
from tts_streamer.adapters.voipbin.envelope import Event, EventType

pytestmark = pytest.mark.realtime
__all__ = ["private_amqp_url"]  # the fixture, imported so this module's tests get a private vhost

DELETE_DELAY = 1.0  # the fake call-manager answers external-media DELETEs this late (see below)


def espeak_env(tmp_path: Path, url: str, **overrides: str) -> dict[str, str]:
    """The real voice, INFO logs and a short drain, on top of daemon_process's environment."""
    env = daemon_env(url, f"test-process-{uuid.uuid4().hex[:6]}", str(tmp_path), engine="espeak")
    env.update({"DRAIN_TIMEOUT": "5", "LOG_LEVEL": "INFO"})
    env.update(overrides)
    return env


def by_streaming(sid: str) -> Callable[[Event], bool]:
    return lambda e: (e.data or {}).get("streaming_id", (e.data or {}).get("id")) == sid


@pytest.fixture
def slow_external_media_delete(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The fake call-manager answers DELETE /v1/external-medias late, so the drain visibly takes a
    while: long enough to check that the daemon stopped consuming before it stopped the session."""
    original = FakeCallManager._answer

    async def answer(self: FakeCallManager, request: wire.Request) -> wire.Response:
        if request.method == "DELETE":
            await trio.sleep(DELETE_DELAY)
        response: wire.Response = await original(self, request)
        return response

    monkeypatch.setattr(FakeCallManager, "_answer", answer)
    yield


def delete_requested(rig: Rig, sid: str) -> bool:
    """The fake call-manager has received DELETE /v1/external-medias/<sid> (maybe not answered yet)."""
    return any(r.method == "DELETE" and r.uri.endswith(f"/{sid}") for r in rig.call_manager.requests)


async def poll_until(predicate: Callable[[], bool], interval: float = 0.01) -> None:
    while True:
        if predicate():
            return
        await trio.sleep(interval)


async def collect_stderr(process: trio.Process, into: bytearray) -> None:
    assert process.stderr is not None
    while chunk := await process.stderr.receive_some(65536):
        into += chunk


async def wait_serving(rig: Rig, pod_queue: str, process: trio.Process, stderr: bytearray) -> None:
    """Until the process answers on its per-pod queue (GET of an unknown streaming: typed 404)."""
    probe = f"/v1/streamings/{uuid.uuid4()}"
    while True:
        assert process.returncode is None, f"the daemon exited early:\n{stderr.decode(errors='replace')}"
        reply = await rig.caller.call(pod_queue, probe, "GET", wait=0.5)
        if reply is not None:
            assert reply.status_code == 404 and reply.data["reason"] == "STREAMING_NOT_FOUND"
            return


async def test_serve_answers_and_drains_on_sigterm(
    private_amqp_url: str, tmp_path: Path, slow_external_media_delete: None
) -> None:
    require_rabbitmq()
    env = espeak_env(tmp_path, private_amqp_url)
    pod_queue = f"bin-manager.tts-manager.request.{env['POD_ID']}"
    stderr = bytearray()
    with trio.fail_after(40):
        async with open_rig(pods=0) as rig, trio.open_nursery() as nursery:
            process = await trio.lowlevel.open_process(
                daemon_command("espeak"),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            nursery.start_soon(collect_stderr, process, stderr)
            try:
                with trio.fail_after(15):
                    await wait_serving(rig, pod_queue, process, stderr)
                # Leave the leg to the daemon (no ARI hang-up on DELETE): this test checks its own close.
                rig.call_manager.hangup_delay = None
                body: dict[str, Any] = {
                    "customer_id": str(uuid.uuid4()),
                    "reference_type": "call",
                    "reference_id": str(uuid.uuid4()),
                    "language": "en-US",
                    "direction": "out",
                }
                created = await rig.caller.call(SHARED_QUEUE, "/v1/streamings", "POST", body)
                assert created is not None and created.status_code == 200, created
                sid = created.data["id"]
                assert created.data["pod_id"] == env["POD_ID"]
                message_id = str(uuid.uuid4())
                init = await rig.caller.call(
                    pod_queue, f"/v1/streamings/{sid}/say_init", "POST", {"message_id": message_id}
                )
                assert init is not None and init.status_code == 200
                text = (
                    "This is the real daemon speaking, with the real voice engine, until it is told to stop."
                )
                added = await rig.caller.call(
                    pod_queue,
                    f"/v1/streamings/{sid}/say_add",
                    "POST",
                    {"message_id": message_id, "text": text},
                )
                assert added is not None and added.status_code == 200
                await rig.caller.wait_event(EventType.MESSAGE_PLAY_STARTED, by_streaming(sid))
                call = rig.sim_call_for(sid)

                process.send_signal(signal.SIGTERM)
                signalled_at = trio.current_time()
                # The drain is waiting on the (slow) call-manager DELETE: consuming has stopped by now,
                # while the session is still up and speaking.
                with trio.fail_after(DELETE_DELAY):
                    await poll_until(lambda: delete_requested(rig, sid))
                unanswered = await rig.caller.call(pod_queue, f"/v1/streamings/{sid}", "GET", wait=0.4)
                assert unanswered is None, "the daemon still consumes after SIGTERM"
                assert not call.ended.is_set()
                with trio.fail_after(10):
                    status = await process.wait()
                exited_at = trio.current_time()
            finally:
                if process.returncode is None:
                    process.kill()
                    with trio.CancelScope(shield=True):
                        await process.wait()
            deleted = await rig.caller.wait_event(EventType.STREAMING_DELETED, by_streaming(sid))
            finished = await rig.caller.wait_event(EventType.MESSAGE_PLAY_FINISHED, by_streaming(sid))
            with trio.fail_after(2):
                await call.ended.wait()
            nursery.cancel_scope.cancel()
    log = stderr.decode(errors="replace")
    assert status == 0, log
    assert exited_at - signalled_at < 5 + 2, "the drain is bounded by DRAIN_TIMEOUT"
    assert exited_at - signalled_at >= DELETE_DELAY  # it did wait for the external media to be stopped
    assert deleted.data["id"] == sid and finished.data["id"] == message_id
    assert "message_finish" not in finished.data  # cut short by the shutdown, not played to its end
    assert uuid.UUID(sid) in rig.call_manager.deleted
    assert call.closed_code == 1000 and call.hangup_by == "client_close", (call.closed_code, call.hangup_by)
    assert call.frames_played > 10  # it spoke with espeak before the shutdown
    assert "Traceback" not in log, log


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("AMQP_PREFETCH", "abc"),
        ("DRAIN_TIMEOUT", "0"),
        ("DEFAULT_ENGINE", "nope"),  # only checkable against the engines the daemon has
    ],
)
async def test_a_bad_environment_value_exits_2_naming_the_variable(
    tmp_path: Path, variable: str, value: str
) -> None:
    # An unreachable broker: a bad value must stop the daemon before it tries to connect.
    env = espeak_env(tmp_path, "amqp://guest:guest@127.0.0.1:1/", **{variable: value})
    with trio.fail_after(20):
        done = await trio.run_process(
            daemon_command("espeak"), env=env, check=False, capture_stdout=True, capture_stderr=True
        )
    message = bytes(done.stderr).decode()
    assert done.returncode == 2, message
    assert f"{variable}={value!r}" in message, message
    assert "Traceback" not in message, message
