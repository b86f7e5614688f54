"""Command line: ``tts-streamer demo`` and ``tts-streamer simulate``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING

import attrs
import trio

if TYPE_CHECKING:
    from tts_streamer.adapters.voice import VoiceEngine
    from tts_streamer.demo import DemoOptions


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tts-streamer", description=__doc__)
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default) or ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("serve", help="run the daemon (configuration from environment variables, see docs/)")
    console = sub.add_parser(
        "console", help="the admin console of a running daemon (help lists its commands)"
    )
    console.add_argument("console_args", nargs=argparse.REMAINDER, help="--socket/--host/--port/--json ...")

    demo = sub.add_parser("demo", help="speak two sentences into a simulated Asterisk, flushing the first")
    demo.add_argument("--wav", default="demo.wav", help="where to write what the simulated caller heard")
    demo.add_argument(
        "--engine",
        choices=["espeak", "piper", "synthetic"],
        default="espeak",
        help="espeak (default), piper (needs the piper extra) or synthetic",
    )
    demo.add_argument("--hold", action="store_true", help="keep the call up until SIGINT/SIGTERM")
    demo.add_argument("--lead-frames", type=int, default=None, help="default: what serve ships")
    demo.add_argument("--frames-per-message", type=int, default=None, help="default: what serve ships")

    sim = sub.add_parser("simulate", help="run the chan_websocket simulator on loopback (accepts any id)")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8088)
    return parser


def demo_options(args: argparse.Namespace) -> DemoOptions:
    """The demo's options: serve's shipped pacing (DemoOptions' defaults) unless a flag overrides it."""
    from tts_streamer.demo import DemoOptions

    options = DemoOptions(wav_path=args.wav, engine=args.engine, hold=args.hold)
    if args.lead_frames is not None:
        options = attrs.evolve(options, lead_frames=args.lead_frames)
    if args.frames_per_message is not None:
        options = attrs.evolve(options, frames_per_message=args.frames_per_message)
    return options


def serve(engines: Mapping[str, VoiceEngine] | None = None) -> int:
    """``tts-streamer serve``; ``engines`` replaces the voices built from the environment (tests)."""
    import os

    from tts_streamer.supervisor.config import ConfigError, DaemonConfig
    from tts_streamer.supervisor.daemon import serve_daemon
    from tts_streamer.supervisor.gc_tuning import tune_gc
    from tts_streamer.supervisor.ops.logging_setup import configure_logging

    try:
        config = DaemonConfig.from_env(os.environ)
    except ConfigError as exc:
        print(f"tts-streamer: bad configuration: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, pod_id=config.pod_id, json=config.log_format == "json")
    tune_gc()
    try:
        trio.run(partial(serve_daemon, config, engines=engines))
    except BaseException as exc:
        # Settings only checkable as the daemon starts (DEFAULT_ENGINE against its voices, the console's
        # address and socket directory) arrive here, often inside the nurseries' exception groups.
        refusal = _configuration_error(exc)
        if refusal is None:
            raise
        print(f"tts-streamer: bad configuration: {refusal}", file=sys.stderr)
        return 2
    return 0


def _configuration_error(exc: BaseException) -> Exception | None:
    """The configuration error ``exc`` is, or the first one in its groups if nothing else failed."""
    from tts_streamer.supervisor.config import ConfigError
    from tts_streamer.supervisor.ops.console import ConsoleConfigError

    if isinstance(exc, ConfigError | ConsoleConfigError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        found = [_configuration_error(inner) for inner in exc.exceptions]
        if found and all(found):
            return found[0]
    return None


async def _simulate(host: str, port: int) -> None:
    from tts_streamer.simulator.asterisk import AsteriskSimulator, serve_asterisk_simulator

    sim = AsteriskSimulator(accept_any=True)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(serve_asterisk_simulator, sim, host, port)
        print(f"simulated chan_websocket on ws://{host}:{bound}/media/<any id>", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "serve":
        return serve()
    if args.command == "console":
        from tts_streamer.supervisor.ops.console_client import run_console_client

        return run_console_client(list(args.console_args))
    if args.command == "demo":
        from tts_streamer.demo import DemoError, run_demo

        try:
            return trio.run(run_demo, demo_options(args))
        except DemoError as exc:
            print(f"tts-streamer demo: {exc}", file=sys.stderr)
            return 2
    if args.command == "simulate":
        trio.run(_simulate, args.host, args.port)
        return 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
