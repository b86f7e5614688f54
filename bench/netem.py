"""A network between a vendor adapter and its loopback fake: one-way delay and TLS, for ``bench.vendors``.

``DelayProxy`` listens on 127.0.0.1 and forwards each connection to a fake's plain-text port. The client
side speaks TLS (certificates from ``make_certificates``, a throwaway CA generated at run time) through
a ``DelayedStream``: every byte reaches the other end ``delay`` seconds after it was sent, in both
directions, so a TLS handshake costs its real round trips. Loopback answers the TCP handshake at once, so
the first byte from the client is held one extra round trip (2 x delay): a new connection costs what it
costs across a WAN (TCP 1 RTT, TLS 1.3 1 RTT, then the request). Bandwidth is not limited.

``connections`` counts accepted connections (each one a TCP and a TLS handshake), which is how tests
and the bench see whether an adapter reuses its channel or pool.
"""

from __future__ import annotations

import datetime
import ipaddress
import math
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CHUNK = 65536


@attrs.frozen
class Certificates:
    ca_file: Path  # PEM of the CA: what the adapter must trust
    cert_file: Path  # server certificate (SAN localhost, 127.0.0.1) signed by the CA
    key_file: Path

    @property
    def ca_pem(self) -> bytes:
        return self.ca_file.read_bytes()

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        context.set_alpn_protocols(["h2", "http/1.1"])  # gRPC insists on h2; urllib3 offers http/1.1
        return context

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


def make_certificates(folder: Path) -> Certificates:
    """A CA and a server certificate for localhost/127.0.0.1, valid for a day, written under ``folder``."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tts-streamer bench CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    certs = Certificates(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    certs.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    certs.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    certs.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certs


class DelayedStream(trio.abc.Stream):
    """``inner`` seen across a link with ``delay`` seconds one way: what is sent arrives ``delay`` later,
    what arrives is readable ``delay`` after it was sent. Sends never block (an unbounded link buffer).
    Background tasks run in ``nursery``; ``aclose`` flushes what is in flight first (bounded)."""

    def __init__(
        self,
        inner: trio.abc.Stream,
        delay: float,
        nursery: trio.Nursery,
        *,
        hold_first: float = 0.0,
        lags: list[tuple[float, float]] | None = None,
    ) -> None:
        self._inner = inner
        self._lags = lags
        self._delay = delay
        self._in_send, self._in = trio.open_memory_channel[tuple[float, bytes]](math.inf)
        self._out_send, self._out = trio.open_memory_channel[tuple[float, bytes]](math.inf)
        self._pending = b""
        self._flushed = trio.Event()
        self._not_before = trio.current_time() + hold_first
        nursery.start_soon(self._pump_in)
        nursery.start_soon(self._pump_out)

    async def _pump_in(self) -> None:
        async with self._in_send:
            while True:
                try:
                    data = await self._inner.receive_some(CHUNK)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                try:
                    self._in_send.send_nowait((max(trio.current_time(), self._not_before), bytes(data)))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return  # the reading side was closed: the connection is over
                if not data:
                    return

    async def _pump_out(self) -> None:
        held: tuple[float, bytes] | None = None
        ended = False
        try:
            while not ended:
                if held is None:
                    try:
                        held = await self._out.receive()
                    except trio.EndOfChannel:
                        return
                sent_at, data = held
                held = None
                due = sent_at + self._delay
                if due > trio.current_time():
                    await trio.sleep_until(due)
                # Whatever else is due by now goes out in the same write (fewer wake-ups when busy).
                now = trio.current_time()
                parts = [data]
                while True:
                    try:
                        item = self._out.receive_nowait()
                    except trio.WouldBlock:
                        break
                    except trio.EndOfChannel:
                        ended = True
                        break
                    if item[0] + self._delay > now:
                        held = item
                        break
                    parts.append(item[1])
                start = trio.current_time()
                await self._inner.send_all(b"".join(parts) if len(parts) > 1 else data)
                if self._lags is not None:
                    self._lags.append((start - due, trio.current_time() - due))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._flushed.set()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._pending:
            try:
                sent_at, data = await self._in.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return b""
            if sent_at + self._delay > trio.current_time():
                await trio.sleep_until(sent_at + self._delay)
            self._pending = data
            if not data:
                return b""
        limit = len(self._pending) if max_bytes is None else max_bytes
        out, self._pending = self._pending[:limit], self._pending[limit:]
        return out

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        try:
            self._out_send.send_nowait((trio.current_time(), bytes(data)))
        except trio.ClosedResourceError:
            raise trio.BrokenResourceError("link closed") from None

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self._out_send.close()
        with trio.move_on_after(self._delay + 2.0) as scope:
            scope.shield = True
            await self._flushed.wait()
        self._in.close()
        await self._inner.aclose()


@attrs.define(eq=False)
class DelayProxy:
    """``await nursery.start(proxy.serve)`` -> port. ``upstream``: the fake's ``(host, port)``, or a
    callable returning it (fakes that bind after the proxy starts)."""

    upstream: tuple[str, int] | Callable[[], tuple[str, int]] | None
    delay: float = 0.04
    tls: ssl.SSLContext | None = None
    # Instead of ``upstream``: a fake in this process served on the (decrypted, delayed) stream itself,
    # which saves a loopback socket and a relay per direction, per message.
    local: Callable[[trio.abc.Stream], Awaitable[None]] | None = None
    connections: int = 0  # accepted (each a TCP and, with tls, a TLS handshake)
    # Toward the client: (late when the send began, late when it ended) per write, seconds.
    out_lags: list[tuple[float, float]] = attrs.field(factory=list)
    open: int = 0
    port: int = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        self.open += 1
        try:
            await self._relay_connection(client)
        except Exception as exc:  # one connection's failure must not end the proxy (or the bench)
            print(f"netem: connection ended with {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            self.open -= 1

    async def _relay_connection(self, client: trio.SocketStream) -> None:
        async with trio.open_nursery() as nursery:
            linked = DelayedStream(client, self.delay, nursery, hold_first=2 * self.delay, lags=self.out_lags)
            stream: trio.abc.Stream = linked
            if self.tls is not None:
                stream = trio.SSLStream(linked, self.tls, server_side=True)
            if self.local is not None:
                try:
                    await self.local(stream)
                finally:
                    with trio.move_on_after(2) as cleanup:
                        cleanup.shield = True
                        try:
                            await stream.aclose()
                        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
                            pass
                    nursery.cancel_scope.cancel()
                return
            assert self.upstream is not None
            target = self.upstream() if callable(self.upstream) else self.upstream
            try:
                with trio.fail_after(5):
                    upstream = await trio.open_tcp_stream(*target)
            except (OSError, trio.TooSlowError):
                await linked.aclose()
                return
            async with upstream:
                nursery.start_soon(_relay, stream, upstream, nursery.cancel_scope)
                await _relay(upstream, stream, nursery.cancel_scope)


async def _relay(source: trio.abc.Stream, sink: trio.abc.Stream, scope: trio.CancelScope) -> None:
    """Copy until EOF or an error, then end the whole connection (both directions)."""
    try:
        while data := await source.receive_some(CHUNK):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
        pass
    finally:
        with trio.move_on_after(2) as cleanup:
            cleanup.shield = True
            try:
                await sink.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
                pass
        scope.cancel()
