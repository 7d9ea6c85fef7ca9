"""Imports fine in the master's check, fails in every worker (a crash loop)."""

import setproctitle

if setproctitle.getproctitle().startswith("forkserver: worker"):
    raise RuntimeError("this handler fails in workers")


def handle(conn: object, peer: object) -> None:
    """Never reached."""
