"""Start a program the way systemd passes it listening sockets.

    python listen_shim.py [--names A:B] [--listen-pid N] [--count N] FD... -- PROGRAM ARGS...

Moves each inherited descriptor FD to 3, 4, ... in order, sets
``LISTEN_FDS``, ``LISTEN_FDNAMES`` (if given) and ``LISTEN_PID`` (this
process's own pid, unless ``--listen-pid`` says otherwise), and
``execv``s PROGRAM, which therefore runs with exactly that pid: what
``Popen(env=...)`` alone cannot arrange.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import sys


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--names")
    parser.add_argument("--listen-pid", type=int)
    parser.add_argument("--count", type=int, help="LISTEN_FDS, if not the number of FDs")
    parser.add_argument("fds", nargs="*", type=int)
    parser.add_argument("program", nargs=argparse.REMAINDER)
    if "--" not in argv:
        parser.error("missing -- PROGRAM")
    split = argv.index("--")
    args = parser.parse_args(argv[:split])
    program = argv[split + 1 :]
    # First move every descriptor above the target range, so that placing
    # one at 3 + i never overwrites another that is still to be moved.
    floor = 3 + len(args.fds)
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor) for fd in args.fds]
    for fd in args.fds:
        os.close(fd)
    for offset, fd in enumerate(high):
        os.dup2(fd, 3 + offset, inheritable=True)
        os.close(fd)
    os.environ["LISTEN_FDS"] = str(len(high) if args.count is None else args.count)
    os.environ["LISTEN_PID"] = str(args.listen_pid or os.getpid())
    if args.names is not None:
        os.environ["LISTEN_FDNAMES"] = args.names
    path = shutil.which(program[0]) or program[0]
    os.execv(path, program)


if __name__ == "__main__":
    main(sys.argv[1:])
