"""A child program whose behaviour the supervisor tests choose on its command line.

    python -m tests.supervisor.fake_child NAME [--ready-after S] [--never-ready]
        [--ignore-term] [--block-after S] [--exit-after S] [--exit-code N] [--log FILE]

It speaks the notify protocol through supervisor.notify, as the real children do, and
appends "event name pid monotonic-time" lines to --log so tests can check ordering.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
import time

import trio

from supervisor.notify import Notifier


def record(path: str | None, event: str, name: str) -> None:
    if path:
        with open(path, "a") as f:
            f.write(f"{event} {name} {os.getpid()} {time.monotonic()}\n")


async def main(args: argparse.Namespace) -> int:
    notifier = Notifier()
    record(args.log, "start", args.name)
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    await trio.sleep(args.ready_after)
    if not args.never_ready:
        notifier.notify(READY=1, STATUS=f"{args.name} up")
        record(args.log, "ready", args.name)
    usec = os.environ.get("WATCHDOG_USEC")
    began = trio.current_time()
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_term() -> None:
                async for _ in signals:
                    record(args.log, "term", args.name)
                    await trio.sleep(args.stop_delay)
                    nursery.cancel_scope.cancel()

            if not args.ignore_term:
                nursery.start_soon(stop_on_term)
            while True:
                if usec:
                    notifier.notify(WATCHDOG=1)
                now = trio.current_time() - began
                if args.block_after is not None and now >= args.block_after:
                    time.sleep(3600)  # a loop blocked in C code: no pings, no signals handled
                if args.exit_after is not None and now >= args.exit_after:
                    record(args.log, "exit", args.name)
                    nursery.cancel_scope.cancel()
                    return args.exit_code
                await trio.sleep(0.05)
    record(args.log, "stopped", args.name)
    return 0


def run() -> None:
    faulthandler.enable(all_threads=True)
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--ready-after", type=float, default=0.0)
    parser.add_argument("--never-ready", action="store_true")
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--block-after", type=float)
    parser.add_argument("--exit-after", type=float)
    parser.add_argument("--exit-code", type=int, default=1)
    parser.add_argument("--stop-delay", type=float, default=0.0)
    parser.add_argument("--log")
    sys.exit(trio.run(main, parser.parse_args()))


if __name__ == "__main__":
    run()
