"""The master's answers to ``forkserver ctl``: what each control command does.

``ControlCommands(...).table()`` is the mapping ``control.open_control``
takes.  Every command returns at once (``stop`` and ``scale`` start their
work in the loop; ``reload`` returns a ``control.Deferred`` that the
reload's outcome settles); ``status`` is the snapshot of ``status``, in
the shape documented in ``forkserver.control``; ``metrics`` is the text
``GET /metrics`` answers (``forkserver.metrics``).

Collaborators: the loop (to defer work past the reply), the pool (as
``CommandPool``: find a worker, retire or signal it), the reloader, the
lifecycle (read only) and ``Controls``, the few actions that belong to
the master as a whole.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any, Protocol

from forkserver.control import MAX_WORKERS, CommandError, Deferred
from forkserver.eventloop import EventLoop
from forkserver.lifecycle import Lifecycle
from forkserver.status import Snapshot
from forkserver.worker_table import WorkerRecord, WorkerState, WorkerTable


class Controls(Protocol):
    """The master's own actions, as ``ctl`` asks for them."""

    def scale_to(self, workers: int) -> None: ...
    def stop(self) -> None: ...
    def stop_now(self) -> None: ...
    def reopen_logs(self) -> None: ...
    def snapshot(self) -> Snapshot: ...
    def metrics_text(self) -> str: ...


class CommandPool(Protocol):
    """What the commands use of the pool (``pool.Pool``)."""

    @property
    def table(self) -> WorkerTable: ...
    @property
    def target(self) -> int: ...
    def recycle(self, record: WorkerRecord, reason: str, *, limit: str,
                **extra: object) -> None: ...  # fmt: skip
    def send_signal(self, record: WorkerRecord, signum: signal.Signals) -> None: ...


class ReloadControl(Protocol):
    def control_reload(self) -> Deferred: ...
    @property
    def serving(self) -> int: ...


class ControlCommands:
    def __init__(
        self,
        loop: EventLoop,
        *,
        controls: Controls,
        pool: CommandPool,
        reloader: ReloadControl,
        lifecycle: Lifecycle,
    ) -> None:
        self.loop = loop
        self.controls = controls
        self.pool = pool
        self.reloader = reloader
        self.lifecycle = lifecycle

    def table(self) -> dict[str, Callable[..., object]]:
        return {
            "status": self.status,
            "reload": self.reload,
            "scale": self.scale,
            "kill": self.kill,
            "stop": self.stop,
            "reopen-logs": self.controls.reopen_logs,
            "metrics": self.controls.metrics_text,
        }

    def _refuse_while_stopping(self) -> None:
        if self.lifecycle.stopping:
            raise CommandError("the master is stopping")

    def reload(self) -> Deferred:
        return self.reloader.control_reload()

    def scale(self, workers: int | None = None, by: int | None = None) -> dict[str, int]:
        """``scale N`` sets the count; ``scale +N``/``-N`` (*by*) moves the current
        target, never below 1 nor above ``MAX_WORKERS``."""
        self._refuse_while_stopping()
        count = scaled_target(self.pool.target, by or 0) if workers is None else workers
        self.loop.call_soon(lambda: self.controls.scale_to(count))
        return {"workers": count}

    def kill(self, worker: int, signal_name: str | None = None) -> dict[str, Any]:
        """``ctl kill SLOT|PID``: retire that worker (a successor starts now), or
        send it a signal.  A number that is a worker's pid means that worker;
        otherwise it is a slot of the serving generation.  Either way its
        exit is planned (cause ``ctl kill``): never counted as a crash."""
        self._refuse_while_stopping()
        record = self.pool.table.get(worker)
        if record is None:
            serving = self.reloader.serving
            in_slot = [r for r in self.pool.table if r.slot == worker
                       and not r.retired and r.generation == serving]  # fmt: skip
            if not in_slot:
                raise CommandError(f"no worker has pid or slot {worker}")
            record = in_slot[0]
        signum = signal.Signals[f"SIG{signal_name}"] if signal_name else None
        if signum is None:
            if record.retired or record.state is WorkerState.STOPPING:
                raise CommandError(f"worker {record.slot} (pid {record.pid}) is already "
                                   "stopping (--signal KILL ends it at once)")  # fmt: skip
            self.pool.recycle(record, "asked to stop (ctl kill)", limit="ctl kill")
        else:
            self.pool.send_signal(record, signum)
        return {"slot": record.slot, "pid": record.pid, "signal": signal_name}

    def stop(self, graceful: bool) -> None:
        # Deferred: the reply goes out before the loop can wind down.
        self.loop.call_soon(self.controls.stop if graceful else self.controls.stop_now)

    def status(self) -> dict[str, Any]:
        return self.controls.snapshot().control()


def scaled_target(current: int, by: int) -> int:
    """*current* workers moved by *by*, never below 1 nor above ``MAX_WORKERS``."""
    return min(max(current + by, 1), MAX_WORKERS)


__all__ = ["ControlCommands", "scaled_target"]
