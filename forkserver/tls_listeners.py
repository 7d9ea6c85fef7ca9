"""Which listeners serve TLS, and their contexts, loaded in the master before a fork.

* ``configs(settings)``: the ``tls.TlsConfig`` of each listener table
  that serves TLS (the global ``tls_*`` settings, with the table's own
  keys over them), keyed by table index; ``None`` is the key of the
  listeners opened without a table (the default bind, systemd's
  sockets), which take the global settings.  No file is read.
* ``load(settings)``: the same, each with its ``ssl.SSLContext`` built
  (``tls.build_context``: every file read and checked), as a
  ``ListenerTls``.  Any problem raises ``TlsListenerError`` naming the
  listener, the setting, the file and the reason.

The master calls ``load`` at start (``startup.preflight``, so
``check-config`` says the same) and again for each reload's new
generation; the contexts reach the workers by fork (``WorkerSpec.tls``,
then ``workers.preamble``).  A generation keeps the contexts it was
forked with, so a reload that fails leaves the serving workers with
their certificates.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from forkserver.config import ListenerSettings, Settings
from forkserver.errors import ForkserverError
from forkserver.tls import TlsConfig, TlsConfigError, build_context

__all__ = ["ListenerTls", "TlsListenerError", "configs", "load"]

#: The global settings a TLS listener takes, unless its table sets its own.
GLOBAL_KEYS: Final = ("tls_certfile", "tls_keyfile", "tls_password_file", "tls_cafile",
                      "tls_client_auth", "tls_min_version", "tls_ciphers", "tls_alpn",
                      "tls_handshake_timeout")  # fmt: skip


class TlsListenerError(ForkserverError):
    """A listener's TLS settings, or a file they name, cannot be used."""


@dataclass(frozen=True, slots=True)
class ListenerTls:
    """One TLS listener's handshake: its context and deadline."""

    listener: str  # the listener's name, for errors and logs
    context: ssl.SSLContext
    handshake_timeout: float


def _where(settings: Settings, table: int | None) -> str:
    if table is None:
        return "the default listener"
    item = settings.listeners[table]
    return f"listener {item.name or item.bind!r} (listeners[{table}])"


def _config(settings: Settings, item: ListenerSettings | None) -> TlsConfig | None:
    values: dict[str, object] = {key: getattr(settings, key) for key in GLOBAL_KEYS}
    values.update(item.tls if item is not None else ())
    if not values["tls_certfile"]:
        return None  # plain TCP (a table's tls_certfile = "" turns it off)
    given = {key: value for key, value in values.items() if value is not None}
    return TlsConfig(**given)  # type: ignore[arg-type]


def configs(settings: Settings) -> dict[int | None, TlsConfig]:
    """Each TLS listener table's settings (None: the listeners without a table)."""
    tables: list[tuple[int | None, ListenerSettings | None]] = (
        list(enumerate(settings.listeners)) if settings.listeners else [(None, None)]
    )
    out: dict[int | None, TlsConfig] = {}
    for table, item in tables:
        try:
            found = _config(settings, item)
        except TlsConfigError as exc:
            raise TlsListenerError(f"{_where(settings, table)}: {exc}") from None
        if found is not None:
            out[table] = found
    if settings.listeners:
        # Sockets an upgrade hands over that match no table take the global settings.
        try:
            fallback = _config(settings, None)
        except TlsConfigError as exc:
            raise TlsListenerError(f"{_where(settings, None)}: {exc}") from None
        if fallback is not None:
            out[None] = fallback
    return out


def load(settings: Settings) -> Mapping[int | None, ListenerTls]:
    """Every TLS listener's context, its files read now.  Raises ``TlsListenerError``."""
    out: dict[int | None, ListenerTls] = {}
    for table, config in configs(settings).items():
        name = _where(settings, table)
        try:
            context = build_context(config)
        except TlsConfigError as exc:
            raise TlsListenerError(f"{name}: {exc}") from None
        out[table] = ListenerTls(name, context, config.tls_handshake_timeout)
    return out
