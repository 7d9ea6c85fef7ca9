"""forkserver: a prefork TCP daemon.

One master process owns the listening sockets, accepts connections and
hands each accepted descriptor to a pre-forked worker, which runs the
user's handler.  The public API follows Qt's ``QTcpServer``.
"""

from forkserver.errors import SocketError
from forkserver.eventloop import EventLoop, Signal
from forkserver.hostaddress import HostAddress
from forkserver.tcpserver import NetworkProxy, TcpServer, WaitResult

__all__ = [
    "EventLoop",
    "HostAddress",
    "NetworkProxy",
    "Signal",
    "SocketError",
    "TcpServer",
    "WaitResult",
]

__version__ = "0.1.0"
