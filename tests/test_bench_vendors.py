"""`make bench`'s vendor part in miniature, and the delaying TLS proxy it runs the adapters through.

The smoke run checks the harness end to end (a table, a results file, every vendor measured); its
figures say nothing on a shared machine, so no target is asserted. The proxy tests check what the
bench's figures rest on: a connection through it pays the delay and the extra set-up round trip, TLS
verifies against the generated CA only, and connections are counted.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import trio
from bench.netem import DelayProxy, make_certificates

ROOT = Path(__file__).resolve().parent.parent


async def _echo(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some(4096):
            await stream.send_all(data)


@pytest.mark.realtime
async def test_proxy_adds_the_delay_and_verifies_against_the_generated_ca(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, _echo, 0, host="127.0.0.1"))
        echo_port = listeners[0].socket.getsockname()[1]
        proxy = DelayProxy(("127.0.0.1", echo_port), 0.05, certs.server_context())
        port = await nursery.start(proxy.serve)
        started = time.monotonic()
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, certs.client_context(), server_hostname="localhost")
        with trio.fail_after(5):
            await stream.do_handshake()
            handshake = time.monotonic() - started
            before = time.monotonic()
            await stream.send_all(b"ping")
            assert await stream.receive_some(10) == b"ping"
            round_trip = time.monotonic() - before
        await stream.aclose()
        # TCP (held one round trip) + TLS 1.3 (one round trip), then one round trip per request.
        assert handshake >= 0.2 - 0.01
        assert round_trip >= 0.1 - 0.01
        assert proxy.connections == 1
        # The system's roots do not know the generated CA: production verification is not weakened.
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        strict = trio.SSLStream(tcp, ssl.create_default_context(), server_hostname="localhost")
        with pytest.raises(trio.BrokenResourceError), trio.fail_after(5):
            await strict.do_handshake()
        await tcp.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.realtime
async def test_proxy_serves_an_in_process_fake_on_its_stream_delayed_and_in_order(tmp_path: Path) -> None:
    """``local``: the fake is handed the decrypted, delayed stream (no second loopback socket); a burst of
    writes, forwarded in fewer sends once due, arrives whole and in order, the delay still paid."""
    certs = make_certificates(tmp_path)

    async def burst(stream: trio.abc.Stream) -> None:
        request = await stream.receive_some(10)
        for i in range(200):
            await stream.send_all(b"%s-%03d;" % (request, i))

    async with trio.open_nursery() as nursery:
        proxy = DelayProxy(None, 0.05, certs.server_context(), local=burst)
        port = await nursery.start(proxy.serve)
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, certs.client_context(), server_hostname="localhost")
        expected = b"".join(b"go-%03d;" % i for i in range(200))
        with trio.fail_after(5):
            await stream.do_handshake()
            before = time.monotonic()
            await stream.send_all(b"go")
            received = b""
            while len(received) < len(expected):
                data = await stream.receive_some(65536)
                assert data, "closed early"
                received += data
            round_trip = time.monotonic() - before
        assert received == expected
        assert round_trip >= 0.1 - 0.01
        assert proxy.connections == 1
        await stream.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.realtime
def test_quick_vendor_bench_measures_every_vendor(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), GRPC_VERBOSITY="ERROR")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.vendors", "--quick", "--delay", "0.01", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = list(tmp_path.glob("*-vendors-quick.md"))
    assert len(results) == 1, proc.stdout
    text = results[0].read_text()
    for vendor in ("| gcp |", "| elevenlabs |", "| aws |", "primary errors before any audio"):
        assert vendor in text, text
    assert "## Targets" in text and "FLUSH_MEDIA p99" in text
