"""A bounded load generator for zero-loss tests.

Opens ``total`` connections, at most ``concurrency`` at a time, each sending
one request and reading the whole answer until the server closes.  Every
failure is recorded with its reason (refused, reset, timeout, short or wrong
answer), so a test can assert that *none* happened while it sends signals
to the daemon.  Bounded in count and in time: it stops at ``deadline``
seconds whatever happens, and what did not run counts as a failure.

A load that must overlap something (a reload, an upgrade) cannot be a
fixed count: a fast machine finishes it before the event begins, a slow
one after it ends.  ``BackgroundLoad(..., total=None)`` runs until the test
calls ``stop()`` once the event has been observed; ``OPEN_ENDED_CAP`` and
the deadline still bound it, and ``stop()`` fails the test if a bound ended
the load first.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

REQUEST = b"ping\n"

#: The most connections a load that runs until stopped may open.
OPEN_ENDED_CAP = 200_000


@dataclass
class LoadResult:
    attempted: int = 0
    answered: int = 0
    failures: list[str] = field(default_factory=list)
    #: Why no more connections were started: "total", "deadline" or "stopped".
    ended_by: str = ""

    def failure_summary(self) -> str:
        kinds = Counter(reason.split(":", 1)[0] for reason in self.failures)
        return ", ".join(f"{kind} x{count}" for kind, count in kinds.most_common())


async def _one(
    host: str, port: int, payload: bytes, expect: Callable[[bytes], bool], timeout: float
) -> str | None:
    """One connection, one request; returns None when answered, else the reason."""
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), timeout)
    except TimeoutError:
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:
        return "reset"
    except OSError as exc:
        return f"oserror: {exc}"
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return None if expect(answer) else f"wrong answer: {answer[:60]!r}"


async def _run(
    host: str,
    port: int,
    *,
    total: int,
    concurrency: int,
    deadline: float,
    payload: bytes,
    expect: Callable[[bytes], bool],
    per_connection_timeout: float,
    progress: Callable[[int], None] | None,
    stop: threading.Event | None,
) -> LoadResult:
    result = LoadResult()
    next_index = 0
    stop_at = time.monotonic() + deadline

    def ended_by() -> str | None:
        if next_index >= total:
            return "total"
        if time.monotonic() >= stop_at:
            return "deadline"
        if stop is not None and stop.is_set():
            return "stopped"
        return None

    async def client() -> None:
        nonlocal next_index
        while (reason := ended_by()) is None:
            next_index += 1
            result.attempted += 1
            failure = await _one(host, port, payload, expect, per_connection_timeout)
            if failure is None:
                result.answered += 1
                if progress is not None:
                    progress(result.answered)
            else:
                result.failures.append(failure)
        result.ended_by = result.ended_by or reason  # the first client to stop says why

    await asyncio.gather(*(client() for _ in range(concurrency)))
    if result.ended_by == "deadline":  # cut short: what did not run failed (not if stopped)
        result.failures.extend(["not run: deadline"] * (total - result.attempted))
    return result


def run_load(
    host: str,
    port: int,
    *,
    total: int,
    concurrency: int = 20,
    deadline: float = 60.0,
    payload: bytes = REQUEST,
    expect: Callable[[bytes], bool] | None = None,
    per_connection_timeout: float = 10.0,
    progress: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
) -> LoadResult:
    """Run the load in this thread and return what happened.

    It ends when *total* connections were made, at *deadline* (what did
    not run counts as a failure), or once *stop* is set: the connections
    in flight then finish, and no more start.
    """
    check = expect if expect is not None else (lambda answer: answer == payload)
    return asyncio.run(
        _run(
            host,
            port,
            total=total,
            concurrency=concurrency,
            deadline=deadline,
            payload=payload,
            expect=check,
            per_connection_timeout=per_connection_timeout,
            progress=progress,
            stop=stop,
        )
    )


class BackgroundLoad:
    """The same load on a thread, so a test can signal the daemon meanwhile.

    ``answered`` grows as connections succeed; ``wait_answered(n)`` blocks
    (with a timeout) until at least n were answered, which is how a test
    knows the load is really flowing before it sends a signal.

    With ``total=None`` the load runs until ``stop()``, which the test
    calls once what the load must overlap has been observed; it returns
    the result, and fails if the load had already ended on its own (at
    ``OPEN_ENDED_CAP`` connections or at the deadline, 120 s unless
    given), since then it overlapped less than the test believes.
    A load with a total ends by itself; ``join()`` waits for it.
    Leaving the ``with`` block stops either kind and waits for it.
    """

    def __init__(self, host: str, port: int, *, total: int | None, **kwargs: object) -> None:
        self._cond = threading.Condition()
        self._answered = 0
        self._finished = False
        self._stop = threading.Event()
        self.open_ended = total is None
        self.result: LoadResult | None = None
        self._error: BaseException | None = None
        if self.open_ended:
            kwargs.setdefault("deadline", 120.0)

        def progress(answered: int) -> None:
            with self._cond:
                self._answered = answered
                self._cond.notify_all()

        def target() -> None:
            try:
                self.result = run_load(
                    host, port, total=OPEN_ENDED_CAP if total is None else total,
                    progress=progress, stop=self._stop, **kwargs,  # type: ignore[arg-type]
                )  # fmt: skip
            except BaseException as exc:  # reported by join()
                self._error = exc
            finally:
                with self._cond:  # a flag, as the thread is still alive while it notifies
                    self._finished = True
                    self._cond.notify_all()

        self._thread = threading.Thread(target=target, name="loadgen", daemon=True)

    def __enter__(self) -> BackgroundLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()  # a test that failed half-way does not wait for the whole load
        self._thread.join(timeout=120)

    @property
    def answered(self) -> int:
        with self._cond:
            return self._answered

    def running(self) -> bool:
        return self._thread.is_alive()

    def wait_answered(self, count: int, timeout: float = 30.0) -> None:
        """Block until *count* connections were answered; fail if the load ends first."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._answered >= count or self._finished, timeout
            )
            answered = self._answered
        if answered >= count:
            return
        if not ok:
            raise TimeoutError(f"only {answered} of {count} connections answered in {timeout} s")
        ended = self.result.ended_by if self.result is not None else "an error"
        raise AssertionError(f"the load ended (by {ended}) with {answered} of {count} "
                             f"connections answered")  # fmt: skip

    def stop(self, timeout: float = 120.0) -> LoadResult:
        """End a load that runs until stopped: no new connections, the ones in flight finish."""
        assert self.open_ended, "a load with a total ends by itself: join() it"
        self._stop.set()
        result = self.join(timeout)
        assert result.ended_by == "stopped", (
            f"the load ended by itself (by {result.ended_by}, after {result.attempted} "
            "connections) before the test stopped it: it did not overlap what it had to"
        )
        return result

    def join(self, timeout: float = 120.0) -> LoadResult:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("the load generator did not finish")
        if self._error is not None:
            raise self._error
        assert self.result is not None
        return self.result
