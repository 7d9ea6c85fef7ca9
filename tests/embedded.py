"""A program that embeds the daemon through the public API only, for tests/test_embedding.py.

``python -m tests.embedded run --bind SPEC --workers N --log-format FMT [--object]
[--post-fork-object] [--setting KEY=VALUE ...] HANDLER``: the same shape as
``forkserver run`` (so ``tests.support.start_daemon(module="tests.embedded")``
runs it), but it calls ``forkserver.serve()``.  ``--object`` imports HANDLER
here and passes the function itself; ``--post-fork-object`` passes a
``post_fork`` callable defined here.  A ``StartupFailed`` is printed as
``startup failed: EXIT_CODE ERROR_TYPE: MESSAGE`` and becomes the exit status.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

import forkserver


def post_fork(worker: forkserver.WorkerInfo) -> None:
    """Given as an object: records that it ran, in the worker, after the drop."""
    path = os.path.join(os.environ["HOOK_DIR"], f"embedded_post_fork.{os.getpid()}")
    with open(path, "w") as f:
        json.dump({"pid": os.getpid(), "slot": worker.slot, "uid": os.getuid()}, f)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["run"])
    parser.add_argument("--bind", action="append", default=[])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--log-format", default="text")
    parser.add_argument("--object", action="store_true")
    parser.add_argument("--post-fork-object", action="store_true")
    parser.add_argument("--setting", action="append", default=[], metavar="KEY=JSON")
    parser.add_argument("handler")
    args = parser.parse_args()
    handler: object = args.handler
    if args.object:
        module, _, name = args.handler.partition(":")
        handler = getattr(importlib.import_module(module), name)
    values = {key: json.loads(value) for key, _, value in
              (item.partition("=") for item in args.setting)}  # fmt: skip
    if args.post_fork_object:
        values["post_fork"] = post_fork
    try:
        return forkserver.serve(handler, bind=args.bind, workers=args.workers,
                                log_format=args.log_format, **values)  # fmt: skip
    except forkserver.StartupFailed as exc:
        print(f"startup failed: {exc.exit_code} {type(exc.error).__name__}: {exc}",
              file=sys.stderr)  # fmt: skip
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
