"""Run every reliability scenario and print one table; exit 1 if anything was lost (or a scenario failed).

    python -m tests.reliability.run [--quick] [--soak-seconds N]

Needs the RabbitMQ broker on 127.0.0.1:5672 (``rabbitmq-server -detached``); the scenarios run in a
private vhost (tests/amqp_vhost.py). Full form: 100 sessions through the broker outage, a 10 min soak.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

import pytest
import trio

from tests import amqp_support
from tests.amqp_vhost import private_vhost
from tests.reliability.common import Row, Settings
from tests.reliability.scenarios import SCENARIOS
from tests.services import _reachable

HEADERS = ("scenario", "injected", "sessions", "lost", "figures")


async def run_all(settings: Settings, only: list[str]) -> list[Row]:
    rows: list[Row] = []
    for scenario in SCENARIOS:
        if only and scenario.__name__ not in only:
            continue
        name = scenario.__name__.replace("_", " ")
        print(f"... {name}", file=sys.stderr, flush=True)
        try:
            row = await scenario(settings)
        except Exception as exc:
            traceback.print_exc()
            row = Row(name, "-", 0, lost=1, figures=f"scenario failed: {leaf(exc)!r}"[:300])
            row.losses.append("the scenario itself failed")
        rows.append(row)
        print(f"    lost {row.lost}" + (f": {'; '.join(row.losses)}" if row.losses else ""), file=sys.stderr)
    return rows


def leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def render(rows: list[Row]) -> str:
    cells = [
        (r.name, r.injected, str(r.sessions), "skipped" if r.skipped else str(r.lost), r.skipped or r.figures)
        for r in rows
    ]
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join(" --- " for _ in HEADERS) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in cells]
    for row in rows:
        if row.losses:
            lines.append(f"lost in {row.name}: " + "; ".join(row.losses))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the short forms (what pytest runs)")
    parser.add_argument("--soak-seconds", type=float, default=None, help="soak length (600, quick 20)")
    parser.add_argument(
        "--only", action="append", default=[], choices=[s.__name__ for s in SCENARIOS], help="repeatable"
    )
    args = parser.parse_args(argv)
    soak_seconds = args.soak_seconds if args.soak_seconds is not None else (20.0 if args.quick else 600.0)
    settings = Settings(quick=args.quick, soak_seconds=soak_seconds)
    if not _reachable("127.0.0.1", 5672):
        print("RabbitMQ not reachable at 127.0.0.1:5672 (start it with: rabbitmq-server -detached)")
        return 2
    logging.basicConfig(level=logging.CRITICAL)  # the daemon logs every injected fault; the table says it
    with private_vhost() as url, pytest.MonkeyPatch.context() as patch:
        patch.setattr(amqp_support, "RABBITMQ_URL", url)
        rows = trio.run(run_all, settings, args.only)
    print(render(rows))
    return 1 if any(row.lost for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
