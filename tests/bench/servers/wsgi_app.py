"""The trivial WSGI application gunicorn serves in the benchmark."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

BODY = b"Hello, world\n"


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response(
        "200 OK",
        [
            ("Content-Type", "text/plain"),
            ("Content-Length", str(len(BODY))),
            ("X-Worker", str(os.getpid())),
        ],
    )
    return [BODY]
