"""The admin console server: operators see and steer the running daemon over a line protocol.

Served on a unix socket (mode 0600) by default, or on TCP; a non-loopback TCP address is refused
unless a token is configured, and with a token the client's first line must be that token. Each
connection runs in its own task (``console[n]``) and is bounded in time everywhere: a client idle for
too long, or slow to finish a line, is disconnected; every write has a timeout, so a client that stops
reading is dropped rather than waited for. A command that a client abandons still completes: commands
run to their end in the connection's task and only the reply is lost.

Protocol: the client sends one command per line; every response is zero or more non-empty lines
followed by one empty line (so ``nc -U`` works for humans and scripts can find the end). The server
greets with one line (after the token, when there is one). See console_commands.py for the commands.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import logging
import os
import stat
import tempfile
from collections.abc import Sequence

import attrs
import trio

from tts_streamer.adapters.serving import serve_stream_listeners
from tts_streamer.supervisor.event_bus import EventBus
from tts_streamer.supervisor.ops.console_commands import ClientGone, ConsoleCommands
from tts_streamer.supervisor.ops.console_views import EventHistory, error_row
from tts_streamer.supervisor.ops.metrics import Metrics
from tts_streamer.supervisor.sessions import Supervisor

__all__ = [
    "ClientGone",
    "Console",
    "ConsoleConfigError",
    "ConsoleTimeouts",
    "check_private_directory",
    "default_console_path",
    "serve_console",
]

log = logging.getLogger(__name__)

GREETING = "tts-streamer console: type help for commands, quit to leave"
MAX_LINE_BYTES = 16384  # say's text is at most 5000 bytes of UTF-8 by default
_RECEIVE_BYTES = 4096
_STALE_PROBE_TIMEOUT = 1.0

ConsoleAddress = str | tuple[str, int]


class ConsoleConfigError(Exception):
    """The console cannot be served as configured (a startup error, reported before serving)."""


@attrs.frozen
class ConsoleTimeouts:
    idle: float = 3600.0  # no command for this long: the console is closed
    line: float = 30.0  # a line, once begun, must be complete within this
    auth: float = 10.0  # the token line must arrive within this
    write: float = 5.0  # each write; a client that does not read for this long is dropped
    command: float = 10.0  # waiting for a session's reply


def default_console_path() -> str:
    """``$XDG_RUNTIME_DIR/tts-streamer/console.sock``, else a per-user directory under the temp dir."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "tts-streamer", "console.sock")
    return os.path.join(tempfile.gettempdir(), f"tts-streamer-{os.getuid()}", "console.sock")


def _our_uid() -> int:
    return os.getuid()


def check_private_directory(directory: str) -> None:
    """Refuse a directory that is not ours alone: not owned by us, writable by group or others, or a
    symlink. The default console directory sits in a shared temp dir, where anyone may have created
    it first, to put their own socket there or read ours (issue 14, §8). Raises ConsoleConfigError."""
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        return  # created by us (mode 0700) when the socket is bound
    problems = []
    if not stat.S_ISDIR(info.st_mode):
        problems.append("not a directory" + (" (a symlink)" if stat.S_ISLNK(info.st_mode) else ""))
    if info.st_uid != _our_uid():
        problems.append(f"owned by uid {info.st_uid}, not {_our_uid()}")
    if stat.S_IMODE(info.st_mode) & 0o022:
        problems.append(f"mode {stat.S_IMODE(info.st_mode):04o} lets group or others write to it")
    if problems:
        raise ConsoleConfigError(
            f"the console directory {directory} is not private: {'; '.join(problems)}. Remove it, "
            "or set ADMIN_SOCKET (or XDG_RUNTIME_DIR) to a directory only this user can write"
        )


def _check_if_default_directory(path: str) -> None:
    """The private-directory check for the default socket path; an explicit ADMIN_SOCKET is the
    operator's choice (it may well sit in a shared, sticky directory such as /tmp)."""
    directory = os.path.dirname(os.path.abspath(path))
    if directory == os.path.dirname(os.path.abspath(default_console_path())):
        check_private_directory(directory)


class _Connection:
    """One console client: buffered line reads and terminated responses, all under timeouts."""

    def __init__(self, stream: trio.abc.Stream, timeouts: ConsoleTimeouts) -> None:
        self._stream = stream
        self._timeouts = timeouts
        self._buffer = bytearray()
        self._eof = False

    async def read_line(self, *, idle: float) -> bytes | None:
        """The next line without its line ending; None at end of stream. Raises ClientGone."""
        deadline = trio.current_time() + idle
        line_started = bool(self._buffer)
        if line_started:
            deadline = min(deadline, trio.current_time() + self._timeouts.line)
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return line.rstrip(b"\r")
            if len(self._buffer) > MAX_LINE_BYTES:
                await self._send_best_effort(
                    f"error: line_too_long: lines are limited to {MAX_LINE_BYTES} bytes"
                )
                raise ClientGone
            if self._eof:
                if self._buffer:
                    # `printf sessions | nc -U ...` without a final newline still runs the command.
                    line = bytes(self._buffer)
                    self._buffer.clear()
                    return line.rstrip(b"\r")
                return None
            data = await self._receive(deadline)
            if not data:
                self._eof = True
            elif not line_started:
                line_started = True
                deadline = min(deadline, trio.current_time() + self._timeouts.line)
            self._buffer += data

    async def _receive(self, deadline: float) -> bytes | bytearray:
        with trio.move_on_at(deadline):
            try:
                return await self._stream.receive_some(_RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise ClientGone from None
        await self._send_best_effort("error: timeout: nothing received in time, closing")
        raise ClientGone

    async def send_rows(self, rows: Sequence[str]) -> None:
        if rows:
            await self._send("".join(_row(row) + "\n" for row in rows))

    async def send_response(self, rows: Sequence[str]) -> None:
        await self._send("".join(_row(row) + "\n" for row in rows) + "\n")

    async def wait_for_input(self) -> None:
        # Used while following events: no idle limit, the client is reading what we send.
        line = await self.read_line(idle=float("inf"))
        if line is None:
            raise ClientGone

    async def _send(self, text: str) -> None:
        with trio.move_on_after(self._timeouts.write):
            try:
                await self._stream.send_all(text.encode())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise ClientGone from None
            return
        raise ClientGone  # not reading: drop it, never let it hold anything up

    async def _send_best_effort(self, row: str) -> None:
        with contextlib.suppress(ClientGone):
            await self.send_response([row])


def _row(row: str) -> str:
    # An empty row would end the response early; rows never contain line breaks either.
    row = row.replace("\r", " ").replace("\n", " ")
    return row or "-"


class Console:
    """Console state shared by all connections: the event history, counters and the commands."""

    def __init__(
        self,
        supervisor: Supervisor,
        bus: EventBus,
        *,
        metrics: Metrics | None = None,
        token: str | None = None,
        timeouts: ConsoleTimeouts = ConsoleTimeouts(),
        history: EventHistory | None = None,
    ) -> None:
        self.token = token
        self.timeouts = timeouts
        self.history = history or EventHistory()
        bus.add_listener(self.history.record)
        self.commands = ConsoleCommands(
            supervisor, bus, self.history, metrics=metrics, command_timeout=timeouts.command
        )

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one console client on ``stream`` until it quits, closes or times out; closes it."""
        counters = self.commands.counters
        counters.connections_open += 1
        counters.connections_total += 1
        connection = _Connection(stream, self.timeouts)
        try:
            if self.token is not None and not await self._authenticate(connection):
                return
            await connection.send_response([GREETING])
            while True:
                raw = await connection.read_line(idle=self.timeouts.idle)
                if raw is None:
                    return
                try:
                    line = raw.decode()
                except UnicodeDecodeError as exc:
                    await connection.send_response([f"error: bad_text: line is not UTF-8 (byte {exc.start})"])
                    continue
                outcome = await self.commands.execute(line, connection)
                await connection.send_response(outcome.rows)
                if outcome.close:
                    return
        except ClientGone:
            pass
        finally:
            counters.connections_open -= 1
            await trio.aclose_forcefully(stream)

    async def _authenticate(self, connection: _Connection) -> bool:
        assert self.token is not None
        line = await connection.read_line(idle=self.timeouts.auth)
        if line is not None and hmac.compare_digest(line, self.token.encode()):
            return True
        log.warning("console: a client sent a wrong token")
        await connection._send_best_effort(
            error_row("bad_token", "the first line must be the console token", as_json=False)
        )
        return False


async def serve_console(
    supervisor: Supervisor,
    bus: EventBus,
    *,
    unix_path: str | None = None,
    host: str | None = None,
    port: int = 0,
    token: str | None = None,
    metrics: Metrics | None = None,
    timeouts: ConsoleTimeouts = ConsoleTimeouts(),
    max_connections: int = 16,
    task_status: trio.TaskStatus[ConsoleAddress] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the console until cancelled. ``nursery.start`` returns the socket path or (host, port).

    With ``host``: TCP, and without a token only loopback addresses are allowed. Otherwise a unix
    socket at ``unix_path`` (default: ``default_console_path()``). Raises ConsoleConfigError.
    """
    if host is not None and unix_path is not None:
        raise ConsoleConfigError("give either unix_path or host, not both")
    if token is not None and not token:
        raise ConsoleConfigError("the console token must not be empty")
    if host is not None:
        listeners = await _open_tcp(host, port, token)
        address: ConsoleAddress = (host, listeners[0].socket.getsockname()[1])
        socket_inode = None
    else:
        path = unix_path or default_console_path()
        listener, socket_inode = await _open_unix(path)
        listeners = [listener]
        address = path
    try:
        # Created once the socket is ours, so a failed start leaves no listener on the bus.
        console = Console(supervisor, bus, metrics=metrics, token=token, timeouts=timeouts)
        log.info("admin console on %s", address)
        task_status.started(address)
        await serve_stream_listeners(
            listeners, console.handle_stream, name="console", max_connections=max_connections
        )
    finally:
        if socket_inode is not None:
            _remove_own_socket(str(address), socket_inode)


async def _open_tcp(host: str, port: int, token: str | None) -> list[trio.SocketListener]:
    listeners = await trio.open_tcp_listeners(port, host=host)
    if token is None:
        # Judge what was actually bound (a name may resolve to several addresses), before accepting.
        exposed = [
            address
            for listener in listeners
            if not ipaddress.ip_address(address := listener.socket.getsockname()[0]).is_loopback
        ]
        if exposed:
            for listener in listeners:
                await trio.aclose_forcefully(listener)
            raise ConsoleConfigError(
                f"the console on {host!r} would listen on non-loopback address {exposed[0]}: "
                "set a token (ADMIN_TOKEN) to serve it there"
            )
    return listeners


async def _open_unix(path: str) -> tuple[trio.SocketListener, int]:
    """Listen on ``path`` with mode 0600, replacing a stale socket file; refuse a live one."""
    _check_if_default_directory(path)
    existing = _socket_file_state(path)
    if existing == "socket":
        if await _socket_answers(path):
            raise ConsoleConfigError(f"another process is serving a console on {path}")
    elif existing == "other":
        raise ConsoleConfigError(f"{path} exists and is not a socket; not replacing it")
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    temporary = f"{path}.{os.getpid()}"
    try:
        _unlink_if_present(temporary)
        await sock.bind(temporary)
        # Restrict before listen(): until listen() nobody can connect, so there is no window in which
        # the socket is reachable with the umask's looser mode.
        os.chmod(temporary, 0o600)
        sock.listen(64)
        # rename() is atomic: clients see the stale socket or ours, and a stale file is replaced.
        os.replace(temporary, path)
    except BaseException:
        sock.close()
        _unlink_if_present(temporary)
        raise
    return trio.SocketListener(sock), os.stat(path).st_ino


def _socket_file_state(path: str) -> str:
    """ "missing", "socket" or "other"; creates a missing parent directory (mode 0700)."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "missing"
    return "socket" if stat.S_ISSOCK(mode) else "other"


async def _socket_answers(path: str) -> bool:
    probe = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    with probe:
        with trio.move_on_after(_STALE_PROBE_TIMEOUT):
            try:
                await probe.connect(path)
            except OSError:
                return False  # nobody listening: a leftover of a daemon that died
            return True
        return True  # something holds it but does not accept promptly: do not steal it


def _unlink_if_present(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _remove_own_socket(path: str, inode: int) -> None:
    # Only if the file is still ours: a newer daemon may have taken the path over meanwhile.
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == inode:
            os.unlink(path)
