"""Console configuration that must be refused, and how (issue 14, §8).

The default socket directory under the shared temp dir must be ours alone; a console that may not be
served as configured stops ``tts-streamer serve`` with exit status 2 and one line naming the variable.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from contextlib import redirect_stderr
from io import StringIO
from pathlib import Path

import pytest
import trio

from tests.test_console import serving_console, start_console
from tts_streamer.supervisor.config import ConfigError, DaemonConfig
from tts_streamer.supervisor.ops import console as console_module
from tts_streamer.supervisor.ops.console import ConsoleConfigError
from tts_streamer.supervisor.ops.console_client import run_console_client

ROOT = Path(__file__).resolve().parent.parent

if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("unix sockets, owners and modes as on Linux")


@pytest.fixture
def default_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """ADMIN_SOCKET and XDG_RUNTIME_DIR unset: the default is <tmp>/tts-streamer-<uid>/console.sock."""
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    directory = tmp_path / f"tts-streamer-{os.getuid()}"
    assert console_module.default_console_path() == str(directory / "console.sock")
    return directory


def make_directory(path: Path, mode: int) -> None:
    path.mkdir()
    os.chmod(path, mode)


def entries(path: Path) -> list[Path]:
    return list(path.iterdir())


@pytest.mark.realtime
async def test_a_default_directory_others_may_write_is_refused(nursery, default_directory: Path):
    make_directory(default_directory, 0o777)  # as someone who got there first would leave it
    with trio.fail_after(5):
        with pytest.raises(ConsoleConfigError, match=re.escape(str(default_directory)) + ".*mode 0777"):
            await start_console(nursery)
        os.chmod(default_directory, 0o730)
        with pytest.raises(ConsoleConfigError, match="mode 0730 lets group or others write"):
            await start_console(nursery)
    assert entries(default_directory) == []  # nothing was bound there


@pytest.mark.realtime
async def test_a_default_directory_owned_by_someone_else_is_refused(
    nursery, default_directory: Path, monkeypatch: pytest.MonkeyPatch
):
    make_directory(default_directory, 0o700)
    monkeypatch.setattr(console_module, "_our_uid", lambda: os.getuid() + 1)
    with trio.fail_after(5), pytest.raises(ConsoleConfigError, match="owned by uid"):
        await start_console(nursery)
    status, err = run_client([])  # the client does not connect into it either
    assert status == 1 and str(default_directory) in err and "owned by uid" in err


@pytest.mark.realtime
async def test_a_default_directory_that_is_a_symlink_is_refused(nursery, default_directory: Path):
    elsewhere = default_directory.parent / "elsewhere"
    make_directory(elsewhere, 0o700)
    os.symlink(elsewhere, default_directory)
    with trio.fail_after(5), pytest.raises(ConsoleConfigError, match="a symlink"):
        await start_console(nursery)


@pytest.mark.realtime
async def test_a_private_default_directory_is_used(nursery, default_directory: Path):
    with trio.fail_after(5):
        async with serving_console(nursery) as address:
            assert address == str(default_directory / "console.sock")
            assert os.stat(default_directory).st_mode & 0o777 == 0o700
        async with serving_console(nursery) as address:  # created earlier, still ours: fine
            assert address == str(default_directory / "console.sock")


def run_client(argv: list[str]) -> tuple[int, str]:
    err = StringIO()
    with redirect_stderr(err):
        status = run_console_client(["--timeout", "1", *argv, "stats"])
    return status, err.getvalue()


# -- a refused console configuration: exit 2, one line -------------------------------------------------


def test_a_public_console_without_a_token_is_a_configuration_error():
    with pytest.raises(ConfigError, match="ADMIN_TOKEN"):
        DaemonConfig.from_env({"ADMIN_HOST": "0.0.0.0"})
    with pytest.raises(ConfigError, match="ADMIN_HOST='::'"):
        DaemonConfig.from_env({"ADMIN_HOST": "::"})
    assert DaemonConfig.from_env({"ADMIN_HOST": "0.0.0.0", "ADMIN_TOKEN": "t"}).admin_token == "t"
    for loopback in ("127.0.0.1", "::1", "localhost"):
        assert DaemonConfig.from_env({"ADMIN_HOST": loopback}).admin_host == loopback


def serve_in_subprocess(extra_env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("ADMIN_", "HTTP_", "MEDIA_", "RABBITMQ_", "DATABASE_"))
    }
    env.update(
        PYTHONPATH=str(ROOT / "src"),
        RABBITMQ_ADDRESS="amqp://guest:guest@127.0.0.1:1/",  # never reached: it must stop before
        HTTP_PORT="0",
        MEDIA_HTTP_PORT="0",
        SQLITE_PATH=str(tmp_path / "s.sqlite3"),
        MEDIA_DIR=str(tmp_path / "media"),
        XDG_RUNTIME_DIR=str(tmp_path),
    )
    env.update(extra_env)
    return subprocess.run(
        [sys.executable, "-m", "tts_streamer.cli", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.realtime
def test_serve_exits_2_with_one_line_for_a_public_console_without_a_token(tmp_path: Path):
    result = serve_in_subprocess({"ADMIN_HOST": "0.0.0.0"}, tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "ADMIN_HOST" in lines[0] and "ADMIN_TOKEN" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.realtime
def test_serve_exits_2_with_one_line_when_the_console_directory_is_not_private(tmp_path: Path):
    runtime = tmp_path / "runtime"
    (runtime / "tts-streamer").mkdir(parents=True)
    os.chmod(runtime / "tts-streamer", 0o777)
    result = serve_in_subprocess({"XDG_RUNTIME_DIR": str(runtime), "LOG_LEVEL": "ERROR"}, tmp_path)
    assert result.returncode == 2, result.stderr
    # Found as the daemon starts (after logging began): one line of its own, no traceback.
    assert "Traceback" not in result.stderr and "ExceptionGroup" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("tts-streamer:")]
    assert len(lines) == 1 and "not private" in lines[0] and "ADMIN_SOCKET" in lines[0], result.stderr
