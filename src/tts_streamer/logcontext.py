"""Which call the current task works for, for log lines.

A session sets ``call_id`` at the start of its task; every task it spawns inherits the value (Trio
copies the context into child tasks), so all of a call's log lines carry it without passing it around.
"""

from __future__ import annotations

from contextvars import ContextVar

call_id: ContextVar[str | None] = ContextVar("call_id", default=None)
