"""A mesh subscriber with a slow callback and small pending limits, as a process of its own.

    python -m tests.chaos.slow_subscriber --nats URL --subject S --pending-msgs N \\
        --pending-bytes B --work SECONDS --record-dir DIR --consumer NAME --stats FILE

A `fire` subscription (core NATS): what does not fit in its pending limits is dropped
by the client and counted. The process records every message its callback finished
(as the chaos worker does, see `chaos_nodes`), prints ``ready`` on stderr once
subscribed, and writes its client's counters (and the messages pending in the
subscription) as JSON to ``--stats`` (replaced
atomically) every 50 ms, and once more on SIGTERM after draining, before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

from mesh import MeshClient, Message, Subscription
from tests.chaos.chaos_nodes import Recorder, message_id

STATS_INTERVAL = 0.05


def _write_stats(path: Path, client: MeshClient, sub: Subscription) -> None:
    stats = client.stats()
    record = {
        "received": stats.received,
        "dropped": stats.dropped,
        "pending": sub.pending,
        "disconnects": stats.disconnects,
        "reconnects": stats.reconnects,
    }
    partial = path.with_name(path.name + ".part")
    partial.write_text(json.dumps(record))
    os.replace(partial, path)


async def main(args: argparse.Namespace) -> None:
    recorder = Recorder(Path(args.record_dir), args.consumer)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def slow(msg: Message) -> None:
        await asyncio.sleep(args.work)
        recorder.record(message_id(msg.data))

    stats_path = Path(args.stats)
    async with await MeshClient.connect(args.nats, name="chaos-slow") as client:
        sub = await client.subscribe(
            args.subject,
            slow,
            pending_msgs=args.pending_msgs,
            pending_bytes=args.pending_bytes,
        )
        await client.flush()
        print("ready", file=sys.stderr, flush=True)
        while not stop.is_set():
            _write_stats(stats_path, client, sub)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), STATS_INTERVAL)
    _write_stats(stats_path, client, sub)  # closing drained the subscription: the final counts


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="slow_subscriber", description=__doc__)
    parser.add_argument("--nats", required=True)
    parser.add_argument("--subject", required=True)
    parser.add_argument("--pending-msgs", type=int, required=True)
    parser.add_argument("--pending-bytes", type=int, required=True)
    parser.add_argument("--work", type=float, required=True, help="seconds per message")
    parser.add_argument("--record-dir", required=True)
    parser.add_argument("--consumer", required=True)
    parser.add_argument("--stats", required=True)
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse(sys.argv[1:])))
