"""``python -m tests.faulty_master run ...``: forkserver with one bug planted in its master.

The master's handling of a handler error raises once it has logged the
error, when the error's message says "boom": a bug in one of the
master's loop callbacks that a test triggers from outside (a client
asks ``tests.handlers.basic:boom`` to raise), to check that the
master's error boundary logs it and the master keeps serving.  Nothing
in forkserver itself can be made to raise so from outside.
"""

from __future__ import annotations

import sys

from forkserver import channel, cli, master
from forkserver.worker_table import WorkerRecord

_handler_error = master.Master._handler_error


def _planted_bug(self: master.Master, record: WorkerRecord, error: channel.HandlerError) -> None:
    _handler_error(self, record, error)
    if "boom" in error.message:
        raise RuntimeError("a bug planted in the master's handler-error path")


master.Master._handler_error = _planted_bug  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(cli.main())
