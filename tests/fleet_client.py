"""The fleet's load client: one new connection per request, bounded in count and time.

Run inside the client's network namespace by the fleet test and bench::

    ip netns exec NS python -m tests.fleet_client 198.18.0.1:8000 --total 2000

Each connection sends one line and reads the whole answer, a JSON object
from ``tests.handlers.fleet`` naming the host that served it and the
client address its handler saw.  Every ``--progress`` answers it prints
``progress ANSWERED FAILED``; at the end one line ``result {...}`` with
every request: its outcome (``ok`` or why not: ``refused``, ``reset``,
``timeout``, ``empty`` for a close without an answer, ``wrong``), the host,
the client address seen, and when it started and ended on the
monotonic clock (shared by every namespace, so the test can compare it
with when it killed a host).  It stops at ``--deadline`` whatever
happens; what did not run is counted as ``not_run``.  ``--stop-file``
ends it early once that file exists (checked between requests).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any

REQUEST = b"ping\n"


async def one(host: str, port: int, timeout: float) -> dict[str, Any]:
    started = time.monotonic()
    record: dict[str, Any] = {"start": started}
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        writer.write(REQUEST)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout)  # to the close
    except TimeoutError:
        record["outcome"] = "timeout"
    except ConnectionRefusedError:
        record["outcome"] = "refused"
    except (ConnectionResetError, BrokenPipeError):
        record["outcome"] = "reset"
    except OSError as exc:
        record["outcome"] = f"oserror {exc.errno}"
    else:
        if not answer:
            record["outcome"] = "empty"
        else:
            try:
                seen = json.loads(answer)
                record.update(outcome="ok", host=seen["host"], client=seen["client"])
            except (ValueError, KeyError, TypeError):
                record.update(outcome="wrong", answer=answer[:80].decode("latin-1"))
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    record["end"] = time.monotonic()
    return record


async def run(host: str, port: int, *, total: int, concurrency: int, deadline: float,
              timeout: float, progress: int, stop_file: str | None) -> dict[str, Any]:  # fmt: skip
    records: list[dict[str, Any]] = []
    started = time.monotonic()
    stop_at = started + deadline
    issued = answered = failed = 0

    async def worker() -> None:
        nonlocal issued, answered, failed
        while issued < total and time.monotonic() < stop_at:
            if stop_file is not None and os.path.exists(stop_file):
                return
            issued += 1
            record = await one(host, port, timeout)
            records.append(record)
            if record["outcome"] == "ok":
                answered += 1
            else:
                failed += 1
            if (answered + failed) % progress == 0:
                print(f"progress {answered} {failed}", flush=True)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"records": records, "not_run": total - issued, "elapsed": time.monotonic() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="HOST:PORT")
    parser.add_argument("--total", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--deadline", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=10.0, help="per connection")
    parser.add_argument("--progress", type=int, default=50)
    parser.add_argument("--stop-file")
    ns = parser.parse_args(argv)
    host, _, port = ns.target.rpartition(":")
    result = asyncio.run(run(host, int(port), total=ns.total, concurrency=ns.concurrency,
                             deadline=ns.deadline, timeout=ns.timeout, progress=ns.progress,
                             stop_file=ns.stop_file))  # fmt: skip
    sys.stdout.write("result " + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
