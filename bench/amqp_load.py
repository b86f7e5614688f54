"""An open-loop AMQP request generator in a process of its own (``bench/amqp_latency.py --publishers``).

In the bench's own process the caller shares a Trio loop (and trio-asyncio) with the Asterisk
simulator and the fake call-manager, so on a loaded 2-core machine it cannot offer 1,000 requests/s
itself: the figures then measure the generator. This one is plain asyncio on aiormq (no trio-asyncio,
no aio-pika objects per message, no publisher confirms), so its cost per request is a fraction of the
daemon's; several of them split a rate between them.

It reads one JSON job from stdin (``url``, ``queue``, ``targets`` [[streaming id, message id], ...],
``requests``, ``rate``, ``offset`` (the index of its first request), ``step`` (the stride between its
indices), ``kind`` (``say_add`` or ``get``), ``start_at`` (a ``time.time()`` to start at, so several
generators start together), ``wait`` (seconds to wait for the last replies)), sends its requests at
``start_at + index / total rate`` each, exactly as the in-process pipelined load does (one channel,
one exclusive reply queue, replies matched by correlation id), and writes one JSON line: latencies in
seconds, error statuses, unanswered count, and its own CPU seconds.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from typing import Any

import aiormq
from pamqp import commands as spec

from tts_streamer.adapters.voipbin.envelope import make_request, render_request


def request_body(kind: str, sid: str, message_id: str, index: int) -> bytes:
    if kind == "get":
        return render_request(make_request(f"/v1/streamings/{sid}", "GET", publisher="bench"))
    return render_request(
        make_request(
            f"/v1/streamings/{sid}/say_add",
            "POST",
            {"message_id": message_id, "text": f"word {index}. "},
            publisher="bench",
        )
    )


async def generate(job: dict[str, Any]) -> dict[str, Any]:
    connection = await aiormq.connect(job["url"])
    channel = await connection.channel(publisher_confirms=False)
    declared = await channel.queue_declare("", exclusive=True, auto_delete=True)
    reply_queue = declared.queue or ""
    sent_at: dict[str, float] = {}
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    requests, offset, step = int(job["requests"]), int(job["offset"]), int(job["step"])
    all_answered = asyncio.Event()

    async def on_reply(message: aiormq.abc.DeliveredMessage) -> None:
        now = time.perf_counter()
        started = sent_at.pop(message.header.properties.correlation_id or "", None)
        if started is None:
            return
        latencies.append(now - started)
        status = json.loads(message.body)["status_code"]
        if status != 200:
            statuses[status] = statuses.get(status, 0) + 1
        if len(latencies) == requests:
            all_answered.set()

    await channel.basic_consume(reply_queue, on_reply, no_ack=True)
    targets = job["targets"]
    rate = float(job["rate"])
    loop = asyncio.get_running_loop()
    # start_at is wall-clock (shared by the generators); the schedule itself runs on perf_counter.
    t0 = time.perf_counter() + max(0.0, float(job["start_at"]) - time.time())
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    for n in range(requests):
        index = offset + n * step
        due = t0 + index / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sid, message_id = targets[index % len(targets)]
        correlation_id = str(index)
        properties = spec.Basic.Properties(
            content_type="text/plain", reply_to=reply_queue, correlation_id=correlation_id, delivery_mode=1
        )
        sent_at[correlation_id] = time.perf_counter()
        await channel.basic_publish(
            request_body(job["kind"], sid, message_id, index), routing_key=job["queue"], properties=properties
        )
    sending = time.perf_counter() - t0
    try:
        await asyncio.wait_for(all_answered.wait(), float(job["wait"]))
    except TimeoutError:
        pass
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    del loop
    await connection.close()
    return {
        "latencies": latencies,
        "statuses": statuses,
        "unanswered": len(sent_at),
        "sending_seconds": sending,
        "cpu_seconds": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
    }


def main() -> int:
    job = json.loads(sys.stdin.read())
    result = asyncio.run(generate(job))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
