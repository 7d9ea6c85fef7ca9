"""A bounded load generator for zero-loss tests.

Opens ``total`` connections, at most ``concurrency`` at a time, each sending
one request and reading the whole answer until the server closes.  Every
failure is recorded with its reason (refused, reset, timeout, short or wrong
answer), so a test can assert that *none* happened while it sends signals
to the daemon.  Bounded in count and in time: it stops at ``deadline``
seconds whatever happens, and what did not run counts as a failure.
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


@dataclass
class LoadResult:
    attempted: int = 0
    answered: int = 0
    failures: list[str] = field(default_factory=list)

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
) -> LoadResult:
    result = LoadResult()
    next_index = 0
    stop_at = time.monotonic() + deadline

    async def client() -> None:
        nonlocal next_index
        while next_index < total and time.monotonic() < stop_at:
            next_index += 1
            result.attempted += 1
            reason = await _one(host, port, payload, expect, per_connection_timeout)
            if reason is None:
                result.answered += 1
                if progress is not None:
                    progress(result.answered)
            else:
                result.failures.append(reason)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    not_run = total - result.attempted
    result.failures.extend(["not run: deadline"] * not_run)
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
) -> LoadResult:
    """Run the load to completion in this thread and return what happened."""
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
        )
    )


class BackgroundLoad:
    """The same load on a thread, so a test can signal the daemon meanwhile.

    ``answered`` grows as connections succeed; ``wait_answered(n)`` blocks
    (with a timeout) until at least n were answered, which is how a test
    knows the load is really flowing before it sends a signal.
    """

    def __init__(self, host: str, port: int, **kwargs: object) -> None:
        self._cond = threading.Condition()
        self._answered = 0
        self.result: LoadResult | None = None
        self._error: BaseException | None = None

        def progress(answered: int) -> None:
            with self._cond:
                self._answered = answered
                self._cond.notify_all()

        def target() -> None:
            try:
                self.result = run_load(host, port, progress=progress, **kwargs)  # type: ignore[arg-type]
            except BaseException as exc:  # reported by join()
                self._error = exc
            finally:
                with self._cond:
                    self._cond.notify_all()

        self._thread = threading.Thread(target=target, name="loadgen", daemon=True)

    def __enter__(self) -> BackgroundLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._thread.join(timeout=120)

    @property
    def answered(self) -> int:
        with self._cond:
            return self._answered

    def running(self) -> bool:
        return self._thread.is_alive()

    def wait_answered(self, count: int, timeout: float = 30.0) -> None:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._answered >= count or not self._thread.is_alive(), timeout
            )
        if not ok or self._answered < count:
            raise TimeoutError(f"only {self._answered} of {count} connections answered")

    def join(self, timeout: float = 120.0) -> LoadResult:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("the load generator did not finish")
        if self._error is not None:
            raise self._error
        assert self.result is not None
        return self.result
