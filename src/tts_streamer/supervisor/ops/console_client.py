"""``tts-streamer console``: a small client for the admin console, with line editing and history.

Plain blocking sockets (no Trio): it is a separate, interactive process. Connects to the daemon's unix
socket (default path as the daemon's) or to host:port, sends the token first when given
(``--token`` or ``ADMIN_TOKEN``), then runs commands: the one on the command line, the lines of a
non-interactive stdin, or an interactive prompt (stdlib readline: editing, history, completion).
A response ends at its empty line; ``events`` streams until Enter or Ctrl-C, which stops following.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import socket
import sys
from collections.abc import Iterator
from typing import TextIO

from tts_streamer.supervisor.ops.console import (
    ConsoleConfigError,
    check_private_directory,
    default_console_path,
)

COMMANDS = (
    "sessions",
    "show",
    "say",
    "flush",
    "finish",
    "stop",
    "tasks",
    "events",
    "stats",
    "memory",
    "help",
    "quit",
)
HISTORY_FILE = os.path.join(os.path.expanduser("~"), ".tts_streamer_console_history")
PROMPT = "tts> "


class ConsoleClientError(Exception):
    pass


class _LineSocket:
    """Line reads over a blocking socket, with the buffer visible so select() is used correctly."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray()

    def send_line(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")

    def has_line(self) -> bool:
        return b"\n" in self._buffer

    def read_line(self) -> str:
        while b"\n" not in self._buffer:
            data = self.sock.recv(65536)
            if not data:
                raise ConsoleClientError("the daemon closed the console")
            self._buffer += data
        end = self._buffer.index(b"\n")
        line = self._buffer[:end].decode(errors="replace")
        del self._buffer[: end + 1]
        return line

    def read_response(self) -> Iterator[str]:
        """The rows of one response (up to its empty line)."""
        while line := self.read_line():
            yield line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tts-streamer console", description="Admin console of a running daemon."
    )
    parser.add_argument("--socket", help=f"unix socket path (default {default_console_path()})")
    parser.add_argument("--host", help="connect over TCP to this host instead of the unix socket")
    parser.add_argument("--port", type=int, default=0, help="TCP port (with --host)")
    parser.add_argument("--token", default=None, help="console token (default: $ADMIN_TOKEN)")
    parser.add_argument("--json", action="store_true", help="ask for JSON rows from every command")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for connect and replies")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="run this one command and exit")
    return parser


def with_json(command: str) -> str:
    """Add ``--json`` where the console accepts it (right after ``say``; elsewhere at the end)."""
    words = command.split()
    if not words or "--json" in words[:2] or (words[0] != "say" and "--json" in words):
        return command
    if words[0] == "say":
        return "say --json " + command.strip()[len("say") :].lstrip()
    return command.rstrip() + " --json"


def run_console_client(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    token = args.token if args.token is not None else os.environ.get("ADMIN_TOKEN") or None
    try:
        conn = _connect(args.socket, args.host, args.port, args.timeout)
    except (OSError, ConsoleConfigError) as exc:
        print(f"console: cannot connect: {exc}", file=sys.stderr)
        return 1
    with conn.sock:
        try:
            if token:
                conn.send_line(token)
            greeting = list(conn.read_response())
            if any(line.startswith("error:") for line in greeting):
                print("\n".join(greeting), file=sys.stderr)
                if not token:
                    print(
                        "console: does this console need a token (--token or ADMIN_TOKEN)?", file=sys.stderr
                    )
                return 1
            if args.command:
                return _run(conn, " ".join(args.command), args.json, sys.stdout)
            if not sys.stdin.isatty():
                status = 0
                for line in sys.stdin:
                    if line.strip():
                        status = max(status, _run(conn, line.strip(), args.json, sys.stdout))
                return status
            print("\n".join(greeting))
            return _interactive(conn, args.json)
        except (OSError, ConsoleClientError) as exc:
            print(f"console: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # a second Ctrl-C while following events: leave at once
            return 130


def _connect(path: str | None, host: str | None, port: int, timeout: float) -> _LineSocket:
    if host is not None:
        sock = socket.create_connection((host, port), timeout=timeout)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            if not path:
                # Not into a directory someone else controls: their socket would read our commands.
                path = default_console_path()
                check_private_directory(os.path.dirname(path))
            sock.connect(path)
        except (OSError, ConsoleConfigError):
            sock.close()
            raise
    return _LineSocket(sock)


def _run(conn: _LineSocket, command: str, as_json: bool, out: TextIO) -> int:
    """Send one command and print its response; 1 if it was an error."""
    if as_json:
        command = with_json(command)
    conn.send_line(command)
    if command.split()[0].lower() == "events":
        return _follow(conn, out)
    failed = False
    for line in conn.read_response():
        failed = failed or line.startswith(("error:", '{"error"'))
        print(line, file=out, flush=True)
    return 1 if failed else 0


def _follow(conn: _LineSocket, out: TextIO) -> int:
    """Print streamed events until the response ends; Enter or Ctrl-C asks the daemon to stop."""
    interactive = sys.stdin.isatty()
    timeout = conn.sock.gettimeout()
    conn.sock.settimeout(None)  # events may be minutes apart
    stop_sent = False
    try:
        while True:
            try:
                if not conn.has_line():
                    watched = [conn.sock.fileno()]
                    if interactive and not stop_sent:
                        watched.append(sys.stdin.fileno())
                    ready, _, _ = select.select(watched, [], [])
                    if sys.stdin.fileno() in ready and not stop_sent:
                        sys.stdin.readline()
                        conn.send_line("")
                        stop_sent = True
                        continue
                line = conn.read_line()
            except KeyboardInterrupt:
                if stop_sent:
                    raise
                conn.send_line("")
                stop_sent = True
                continue
            if not line:
                return 0
            print(line, file=out, flush=True)
    finally:
        conn.sock.settimeout(timeout)


def _interactive(conn: _LineSocket, as_json: bool) -> int:
    import readline  # only for a terminal: importing it can write escape codes to a pipe

    with contextlib.suppress(OSError):
        readline.read_history_file(HISTORY_FILE)
    readline.set_history_length(1000)

    def complete(text: str, state: int) -> str | None:
        if readline.get_begidx() != 0:
            return None  # only the command word is completed
        matches = [name + " " for name in COMMANDS if name.startswith(text)]
        return matches[state] if state < len(matches) else None

    readline.set_completer(complete)
    readline.parse_and_bind("tab: complete")
    try:
        while True:
            try:
                line = input(PROMPT)
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print()
                continue
            if not line.strip():
                continue
            _run(conn, line.strip(), as_json, sys.stdout)
            if line.strip().split()[0].lower() == "quit":
                return 0
    finally:
        with contextlib.suppress(OSError):
            readline.write_history_file(HISTORY_FILE)
