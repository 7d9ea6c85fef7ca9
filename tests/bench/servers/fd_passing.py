"""The bare fd-passing prefork: the floor of master dispatch in Python.

A master accepts every connection in an epoll loop and hands the
descriptor to one of N forked workers over a ``SOCK_SEQPACKET``
socketpair with ``socket.send_fds`` (SCM_RIGHTS), then closes its copy.
Each worker blocks in ``socket.recv_fds``, answers the request inline
exactly as the shared-accept baseline does (``shared_accept.read_head``,
then one reply with ``Connection: close``) and closes.  No supervision,
no queue, no take-back: only the mechanism, so forkserver's master
dispatch can be measured against what handing over a descriptor costs
by itself, not only against shared accept.

Modes:
  round-robin   the master sends to the workers in turn and never hears
                from them.
  least-loaded  each worker sends one byte back per finished connection;
                the master counts what each holds and sends to the one
                with the fewest (ties to the lowest), so it reads one
                ack per connection as forkserver reads one DONE.  A
                worker holds at most ``MAX_HELD``; with every worker
                full the master stops accepting until an ack arrives
                (the kernel backlog holds the rest).  Without that bound
                the two would deadlock under load: a SEQPACKET send
                blocks once ``net.unix.max_dgram_qlen`` (10) messages
                wait unread, the master's to a busy worker and that
                worker's ack to a master blocked in its send.

Every response carries ``X-Worker: <pid>`` (fairness).  Run as
``python -m tests.bench.servers.fd_passing`` from the repository root.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import socket
import sys

from tests.bench.servers.shared_accept import read_head, response, set_pdeathsig

ACCEPT_BATCH = 64  # accepts per wake-up, as forkserver's listeners do
MAX_HELD = 8  # least-loaded: connections per worker, below the kernel's queue of 10


def worker_main(chan: socket.socket, ack: bool) -> None:
    set_pdeathsig()
    reply = response(keep_alive=False)
    while True:
        _, fds, _, _ = socket.recv_fds(chan, 1, 1)
        if not fds:
            return  # the master is gone
        with socket.socket(fileno=fds[0]) as conn:
            try:
                if read_head(conn):
                    conn.sendall(reply)
            except OSError:
                pass  # the client went away; the next one is waiting
        if ack:
            chan.send(b"d")


class Master:
    """Accept, pick a worker, pass the descriptor, close the master's copy."""

    def __init__(self, listener: socket.socket, chans: list[socket.socket],
                 least_loaded: bool) -> None:
        self.listener = listener
        self.chans = chans
        self.least_loaded = least_loaded
        self.held = [0] * len(chans)  # connections sent and not yet acked
        self.next = 0
        self.poller = select.epoll()
        listener.setblocking(False)
        self.poller.register(listener.fileno(), select.EPOLLIN)
        self.by_fd = {chan.fileno(): i for i, chan in enumerate(chans)}
        if least_loaded:
            for chan in chans:
                self.poller.register(chan.fileno(), select.EPOLLIN)

    def pick(self) -> int:
        """The worker for the next connection; -1: every one is full."""
        if self.least_loaded:
            held = self.held
            fewest = min(held)
            return held.index(fewest) if fewest < MAX_HELD else -1
        index = self.next
        self.next = (index + 1) % len(self.chans)
        return index

    def run(self, stop_fd: int) -> None:
        lfd = self.listener.fileno()
        self.poller.register(stop_fd, select.EPOLLIN)
        accept = self.listener._accept  # type: ignore[attr-defined]  # an fd, no socket object
        accepting = True
        while True:
            for fd, _ in self.poller.poll():
                if fd == lfd:
                    for _ in range(ACCEPT_BATCH):
                        index = self.pick()
                        if index < 0:
                            self.poller.modify(lfd, 0)  # full: leave them in the backlog
                            accepting = False
                            break
                        try:
                            conn, _ = accept()
                        except BlockingIOError:
                            break
                        socket.send_fds(self.chans[index], [b"c"], [conn])
                        os.close(conn)
                        self.held[index] += 1
                elif fd == stop_fd:
                    return
                else:
                    index = self.by_fd[fd]
                    self.held[index] -= len(self.chans[index].recv(64))
                    if not accepting:
                        self.poller.modify(lfd, select.EPOLLIN)
                        accepting = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="inherited listening socket")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--mode", choices=("round-robin", "least-loaded"), default="round-robin")
    args = parser.parse_args(argv)
    listener = socket.socket(fileno=args.fd)
    listener.set_inheritable(False)
    if listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 1:
        print(f"fd_passing: fd {args.fd} is not a listening socket", file=sys.stderr)
        return 2
    ack = args.mode == "least-loaded"
    # Stop signals wake the master's epoll through a pipe; none reaches a
    # worker's Python before it has its own (default) dispositions.
    stop_r, stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    stop_set = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_set)
    pids: list[int] = []
    chans: list[socket.socket] = []
    for _ in range(args.workers):
        master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            try:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_set)
                listener.close()
                master_end.close()
                for other in chans:
                    other.close()
                worker_main(worker_end, ack)
            finally:
                os._exit(1)
        worker_end.close()
        pids.append(pid)
        chans.append(master_end)
    received: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        received.append(signum)
        with contextlib.suppress(BlockingIOError):
            os.write(stop_w, b"x")

    for signum in stop_set:
        signal.signal(signum, on_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_set)
    Master(listener, chans, least_loaded=ack).run(stop_r)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        os.waitpid(pid, 0)
    if received[0] == signal.SIGCHLD:  # the first signal says why the loop ended
        print("fd_passing: a worker died; stopping", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
