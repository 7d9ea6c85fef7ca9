"""forkserver: a prefork TCP daemon.

One master process owns the listening sockets, accepts connections and
hands each accepted descriptor to a pre-forked worker, which runs the
user's handler.  The public API follows Qt's ``QTcpServer``.
"""

import importlib
from typing import TYPE_CHECKING

from forkserver.errors import SocketError
from forkserver.eventloop import EventLoop, Signal
from forkserver.hostaddress import HostAddress
from forkserver.tcpserver import NetworkProxy, TcpServer, WaitResult

if TYPE_CHECKING:
    from forkserver.config import ConfigError, ListenerSettings, Settings
    from forkserver.daemon import Daemon, StartupFailed, serve, settings
    from forkserver.handshake import TlsInfo
    from forkserver.hooks import WorkerInfo
    from forkserver.sslserver import AlertLevel, AlertType, PeerVerifyError, SslError, SslServer
    from forkserver.workers.preamble import ProxiedConnection, proxy_info
    from forkserver.workers.tlsstep import tls_info

# Imported on first use: the TLS names pull in the ssl module and asyncio,
# which the master, the CLI and a plain-TCP worker never need; the PROXY
# names are for handlers, in workers.
_LAZY = {
    **dict.fromkeys(("AlertLevel", "AlertType", "PeerVerifyError", "SslError", "SslServer"),
                    "forkserver.sslserver"),
    **dict.fromkeys(("ProxiedConnection", "proxy_info"), "forkserver.workers.preamble"),
    # Running the daemon from Python (forkserver.daemon): the master only on run().
    **dict.fromkeys(("Daemon", "StartupFailed", "serve", "settings"), "forkserver.daemon"),
    **dict.fromkeys(("ConfigError", "ListenerSettings", "Settings"), "forkserver.config"),
    "WorkerInfo": "forkserver.hooks",
    "TlsInfo": "forkserver.handshake",
    "tls_info": "forkserver.workers.tlsstep",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'forkserver' has no attribute {name!r}")


__all__ = [
    "AlertLevel",
    "AlertType",
    "ConfigError",
    "Daemon",
    "EventLoop",
    "HostAddress",
    "ListenerSettings",
    "NetworkProxy",
    "PeerVerifyError",
    "ProxiedConnection",
    "Settings",
    "Signal",
    "SocketError",
    "SslError",
    "SslServer",
    "StartupFailed",
    "TcpServer",
    "TlsInfo",
    "WaitResult",
    "WorkerInfo",
    "proxy_info",
    "serve",
    "settings",
    "tls_info",
]

__version__ = "0.1.0"
