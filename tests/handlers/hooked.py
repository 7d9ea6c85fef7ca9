"""Hooks that record each call as a file in $HOOK_DIR (the handler: ``hooked_app``).

Each record is ``NAME.PID`` holding JSON: who ran it (pid, parent, uid)
and what it was given.  Only modules the master has loaded already: the
hooks may run as ``nobody``, who may not read the interpreter's library.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def record(name: str, **data: Any) -> None:
    path = os.path.join(os.environ["HOOK_DIR"], f"{name}.{os.getpid()}")
    with open(path, "w") as f:
        json.dump({"pid": os.getpid(), "ppid": os.getppid(), "uid": os.getuid(), **data}, f)


def on_starting(settings: Any) -> None:
    record("on_starting", workers=settings.workers)


def when_ready(status: dict[str, Any]) -> None:
    record("when_ready", target=status["master"]["workers_target"])


def on_reload(old: Any, new: Any) -> None:
    record("on_reload", old=old.name, new=new.name)


def pre_exec(settings: Any) -> None:
    record("pre_exec")


def on_exit(settings: Any) -> None:
    record("on_exit")


def post_fork(worker: Any) -> None:
    record("post_fork", slot=worker.slot, master=worker.master_pid, handler_loaded=_loaded())


def post_worker_init(worker: Any) -> None:
    record("post_worker_init", slot=worker.slot, handler_loaded=_loaded())


def worker_exit(worker: Any, reason: str) -> None:
    record("worker_exit", slot=worker.slot, reason=reason)


def _loaded() -> bool:
    return "tests.handlers.hooked_app" in sys.modules


def failing(*args: object) -> None:
    raise RuntimeError("this hook fails on purpose")


def hanging(*args: object) -> None:
    while True:  # bounded by hook_timeout (master) or the worker's timeout
        time.sleep(1)  # sleep-ok: a hook that never returns, on purpose
