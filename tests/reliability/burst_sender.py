"""The burst's caller, in a process of its own (so publishing 2,000 requests does not starve the daemon
under test, which shares the scenario's process with the simulator and the fakes).

    python -m tests.reliability.burst_sender URL QUEUE LINGER < plan.json > result.json

``plan.json``: ``[[uri, data], ...]``, one request each, sent at once on one channel, correlation id =
index, one reply queue. Prints ``{"published": {id: t}, "replies": {id: [[t, status], ...]}}`` with
``time.monotonic()`` times (system-wide on Linux, so comparable with the daemon's), after waiting
``LINGER`` seconds past the last publish for replies.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import aio_pika

from tts_streamer.adapters.voipbin import envelope


async def main(url: str, queue: str, linger: float, plan: list[list[Any]]) -> dict[str, Any]:
    connection = await aio_pika.connect(url)
    published: dict[str, float] = {}
    replies: dict[str, list[tuple[float, int]]] = {}
    try:
        channel = await connection.channel(publisher_confirms=False)
        reply_queue = await channel.declare_queue(exclusive=True, auto_delete=True)

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            status = envelope.parse_response(message.body).status_code
            replies.setdefault(message.correlation_id or "?", []).append((time.monotonic(), status))

        await reply_queue.consume(on_reply, no_ack=True)
        for index, (uri, data) in enumerate(plan):
            body = envelope.render_request(envelope.make_request(uri, "POST", data, publisher="burst"))
            message = aio_pika.Message(
                body, content_type="text/plain", correlation_id=str(index), reply_to=reply_queue.name
            )
            published[str(index)] = time.monotonic()
            await channel.default_exchange.publish(message, routing_key=queue)
        await asyncio.sleep(linger)
    finally:
        await connection.close()
    return {"published": published, "replies": replies}


if __name__ == "__main__":
    result = asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), json.load(sys.stdin)))
    json.dump(result, sys.stdout)
