"""The admin console's command lines: what each command takes, and splitting a line into a ``Request``."""

from __future__ import annotations

import attrs

HELP = (
    ("sessions", "list live sessions"),
    ("show <id>", "one session in detail, with its recent events"),
    ("say <id> <text>", "speak text (opens a message first if none is open)"),
    ("flush <id>", "cut what is being said; the call stays up"),
    ("finish <id>", "end the open message's input; what was said plays out"),
    ("stop <id>", "end the session and hang up its media leg"),
    ("tasks", "the live Trio task tree, with where each task waits"),
    ("events [id]", "follow events live (all sessions or one); send any line to stop"),
    ("stats", "process-wide counters"),
    ("memory", "a full GC, then live Python blocks and objects, RSS; stalls the loop: for an idle daemon"),
    ("help", "this list"),
    ("quit", "close this console"),
)


class ConsoleError(Exception):
    """A console-level refusal (bad syntax, timeout); ``kind`` as for CommandError."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@attrs.frozen
class Request:
    name: str
    args: list[str]
    json: bool  # say's args are [id, text], the text's inner spacing kept


# -- parsing -------------------------------------------------------------------------------------------

_ARITY: dict[str, tuple[int, int, str]] = {
    "sessions": (0, 0, "sessions [--json]"),
    "show": (1, 1, "show <id> [--json]"),
    "say": (2, 2, "say [--json] <id> <text>"),  # parsed on its own: the text keeps its spaces
    "flush": (1, 1, "flush <id> [--json]"),
    "finish": (1, 1, "finish <id> [--json]"),
    "stop": (1, 1, "stop <id> [--json]"),
    "tasks": (0, 0, "tasks [--json]"),
    "events": (0, 1, "events [id] [--json]"),
    "stats": (0, 0, "stats [--json]"),
    "memory": (0, 0, "memory [--json]"),
    "help": (0, 0, "help [--json]"),
    "quit": (0, 0, "quit"),
}


def parse(line: str) -> Request:
    """Split a command line. ``--json`` may stand anywhere, except inside say's text (put it first)."""
    name, rest = [*line.strip().split(None, 1), "", ""][:2]
    name = name.lower()
    if name not in _ARITY:
        raise ConsoleError("unknown_command", f"unknown command {name!r} (try help)")
    low, high, usage = _ARITY[name]
    as_json = False
    if name == "say":
        words = rest.split(None, 1)
        if words and words[0] == "--json":
            as_json, words = True, (words[1:] and words[1].split(None, 1))
        if len(words) != 2 or not words[1].strip():
            raise ConsoleError("bad_argument", f"usage: {usage}")
        return Request(name, [words[0], words[1].strip()], as_json)
    args = rest.split()
    if "--json" in args:
        as_json = True
        args = [arg for arg in args if arg != "--json"]
    unknown = [arg for arg in args if arg.startswith("--")]
    if unknown:
        raise ConsoleError("bad_argument", f"unknown option {unknown[0]} (usage: {usage})")
    if not low <= len(args) <= high:
        raise ConsoleError("bad_argument", f"usage: {usage}")
    return Request(name, args, as_json)
