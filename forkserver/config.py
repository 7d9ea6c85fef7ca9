"""Settings: one model, four sources.

Every setting is declared once, as a field of :class:`Settings`, with its
type, default, bounds and one line of help in the field's metadata.  The
command line (``cli.py``), the TOML file, the ``FORKSERVER_<KEY>``
environment variables, ``docs/configuration.md`` and
``config/forkserver.toml`` all come from those declarations.

Precedence, lowest first: defaults < TOML file (``-c``) < environment <
command line.  :func:`load` merges the sources and records where each
value came from (``forkserver check-config`` prints that).

Nothing a source gives is trusted: the file is size-limited, every value
is type- and range-checked, and any problem raises :class:`ConfigError`
whose message names the file, the key (and line, where it can be found)
and what was expected.  The CLI turns that into exit code 78 (or 66 for a
missing file); a reload that raises it leaves the running settings alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from forkserver import listeners
from forkserver.errors import ForkserverError

__all__ = [
    "ENV_PREFIX",
    "ConfigError",
    "ConfigFileNotFound",
    "ListenerSettings",
    "Loaded",
    "Setting",
    "Settings",
    "load",
    "load_settings",
    "load_values",
    "parse_text",
    "setting_fields",
]

ENV_PREFIX: Final = "FORKSERVER_"
# Environment names under this prefix are the daemon's own business (for
# example hand-over state between an old and a new master) and are not
# settings, so they are never reported as unknown.
ENV_RESERVED_PREFIX: Final = "FORKSERVER__"
MAX_FILE_BYTES: Final = 1 << 20       # a config file is small; refuse anything else
MAX_TEXT: Final = 4096                # longest string value (paths are at most PATH_MAX)
MAX_LISTENERS: Final = 256
MAX_ALLOW_ENTRIES: Final = 1024       # proxy_allow_from: balancers, not a firewall
# Bounds on the shape of a TOML file, checked before tomllib parses it:
# tomllib's time and memory grow with the square of a dotted key's length,
# so a 30 KB file could stall the parser for seconds (see _check_shape).
MAX_KEY_PARTS: Final = 32             # a.b.c = 1 has 3
MAX_NESTING: Final = 32               # [ and { open at once
MAX_KEY_LENGTH: Final = 256           # characters in one part of a key
MAX_LINE_LENGTH: Final = 65536
MAX_WATCHED_FILES: Final = 1024       # reload_extra_files: a few files, not a tree
MAX_ACCESS_FORMAT: Final = 1024       # characters of access_log_format

#: The fields ``access_log_format`` may name, with a sample value of each
#: type (the format is tried on them at load, so a bad spec fails there).
#: Bytes read and written are not among them: the handler owns the socket,
#: and counting its bytes would cost a wrapper on every call it makes.
ACCESS_LOG_FIELDS: Final[dict[str, object]] = {
    "listener": "web", "peer": "127.0.0.1:50000", "worker": 0, "pid": 1,
    "duration_ms": 1.5, "status": "ok", "error": "", "exc_type": "-",
}
DEFAULT_ACCESS_LOG_FORMAT: Final = "{listener} {peer} worker {worker} {duration_ms:.1f} ms{error}"

Kind = Literal["int", "float", "bool", "str", "choice", "mode", "bytes", "handler", "listeners",
               "addresses", "bind", "paths", "format", "hostport", "prefix", "names"]


class ConfigError(ForkserverError):
    """The configuration is invalid; the message says where and why."""

    def __init__(self, message: str, *, source: str = "", key: str = "",
                 line: int | None = None) -> None:
        where = source + (f":{line}" if source and line is not None else "")
        prefix = ", ".join(p for p in (where, f"key {key!r}" if key else "") if p)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.source = source
        self.key = key
        self.line = line
        self.reason = message


class ConfigFileNotFound(ConfigError):
    """The config file named with ``-c`` does not exist (exit code 66)."""


@dataclass(frozen=True, slots=True)
class Setting:
    """How one field is read, checked and explained."""

    help: str
    group: str
    kind: Kind
    minimum: float | None = None      # inclusive lower bound
    above: float | None = None        # exclusive lower bound
    maximum: float | None = None      # inclusive upper bound
    choices: tuple[str, ...] = ()
    optional: bool = False            # "" (or "auto" for choices) means None
    flag: str = ""                    # command-line option; "" = --<name-with-dashes>
    env: str = ""                     # environment name; "" = FORKSERVER_<NAME>
    metavar: str = ""
    default_text: str = ""            # how to show a computed default in docs
    example: str = ""                 # TOML value shown for a setting off by default


def _s(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None,
       **meta: Any) -> Any:
    """Declare one setting: its default and its :class:`Setting` metadata."""
    md = {"setting": Setting(**meta)}
    if factory is not None:
        return field(default_factory=factory, metadata=md)
    return field(default=default, metadata=md)


def _cpu_count() -> int:
    return os.cpu_count() or 1


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerSettings:
    """One listening socket.  ``backlog`` None means the settings' ``backlog``;
    settings returned by :func:`load` always have it filled in."""

    bind: str
    name: str = ""
    backlog: int | None = None
    #: None means the settings' ``dispatch``; filled in by :func:`load`.
    dispatch: Literal["master", "shared"] | None = None
    #: None means the settings' ``proxy_protocol``; filled in by :func:`load`.
    proxy_protocol: Literal["off", "v1", "v2"] | None = None
    #: None means the settings' ``proxy_allow_from``; filled in by :func:`load`.
    proxy_allow_from: tuple[str, ...] | None = None
    #: This listener's own ``tls_*`` keys, (key, value) in file order; the
    #: global ``tls_*`` settings fill in the rest (``forkserver.tls_listeners``).
    tls: tuple[tuple[str, Any], ...] = ()
    #: None means the settings' ``defer_accept``; filled in by :func:`load`.
    defer_accept: int | None = None


#: The TLS keys a [[listeners]] table may set: the global ones, and its SNI certificates.
LISTENER_TLS_KEYS: Final = ("tls_certfile", "tls_keyfile", "tls_password_file", "tls_cafile",
                            "tls_client_auth", "tls_min_version", "tls_ciphers", "tls_alpn",
                            "tls_handshake_timeout", "tls_certificates")
#: ``ListenerSettings``' own fields first, then the TLS keys (kept in its ``tls``).
LISTENER_KEYS: Final = ("bind", "name", "backlog", "dispatch", "proxy_protocol",
                        "proxy_allow_from", "defer_accept", *LISTENER_TLS_KEYS)
#: Listener keys whose TOML value is not a string.
_LISTENER_NOT_STR: Final = ("backlog", "proxy_allow_from", "defer_accept")


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything the daemon can be told.  Field order is the order of the
    docs and the example file; ``group`` is how an operator thinks of it."""

    # -- listeners
    listeners: tuple[ListenerSettings, ...] = _s(
        (), kind="listeners", group="listeners", flag="--bind", env="FORKSERVER_BIND",
        metavar="SPEC",
        help="where to listen: HOST:PORT, [V6]:PORT, :PORT, unix:PATH, fd://N, systemd, "
             "systemd:NAME (none: the systemd sockets if passed to us, else 127.0.0.1:8000)")
    backlog: int = _s(2048, kind="int", group="listeners", minimum=1, maximum=65535,
                      help="listen() backlog of each listener that does not set its own")
    max_pending_connections: int = _s(
        30, kind="int", group="listeners", minimum=1, maximum=1_000_000,
        help="accepted connections the master queues while no worker is free; "
             "beyond that it stops accepting and the kernel backlog holds the rest, which "
             "is ordinary operation under load (logged at INFO; a warning only when the "
             "queue stops moving).  While any wait here, a new arrival waits in the "
             "backlog without waking the master, so the queue fills only from the accept "
             "batch that found every worker busy.  Small on purpose: the master's queue "
             "only bridges the moment between a worker freeing up and the next accept, and "
             "a larger one just moves waiting connections out of the backlog into the "
             "master, where each costs a descriptor and a fast stop drops them (an "
             "inherited socket's backlog survives a restart; docs/performance.md)")
    dispatch: Literal["master", "shared"] = _s(
        "master", kind="choice", group="listeners", choices=("master", "shared"),
        help="who accepts on each listener that does not set its own: master (the master "
             "accepts and hands each connection to the least-loaded free worker, with a "
             "master-owned queue) or shared (every worker accepts from the listening "
             "socket itself while it has room: less CPU per connection, but the kernel "
             "spreads connections, there is no master queue, and the backlog waits for "
             "a free worker)")
    defer_accept: int = _s(
        0, kind="int", group="listeners", minimum=0, maximum=3600,
        help="seconds the kernel may hold a new TCP connection on each listener that does "
             "not set its own until its first bytes arrive, before accept() returns it "
             "(TCP_DEFER_ACCEPT, nginx's deferred); 0: off (an inherited socket is left as "
             "its owner set it, as systemd's DeferAcceptSec=).  No worker is then given a "
             "connection whose client has not spoken yet.  Only for protocols where the "
             "client speaks first (HTTP): where the server speaks first (an SMTP banner, "
             "a greeting), each client waits up to this long for it.  Unix sockets ignore "
             "it")
    # -- balancer
    proxy_protocol: Literal["off", "v1", "v2"] = _s(
        "off", kind="choice", group="balancer", choices=("off", "v1", "v2"),
        help="the PROXY protocol header each listener that does not set its own requires "
             "before the client's bytes: off, v1 (text) or v2 (binary).  Never guessed: on "
             "a v1/v2 listener every connection must start with that header, and only from "
             "proxy_allow_from; the handler's peer is then the client the header names")
    proxy_allow_from: tuple[str, ...] = _s(
        (), kind="addresses", group="balancer", metavar="ADDR,...",
        example='["198.18.0.2", "fd00::/8"]',
        help="who may send a PROXY header, for each listener that does not set its own: "
             "IPv4/IPv6 addresses or CIDR networks of the balancers, and unix for Unix "
             "listeners; required whenever proxy_protocol is on (a connection from "
             "anywhere else is closed before the handler runs); 0.0.0.0/0 or ::/0 trusts "
             "every peer, and is warned about")
    proxy_header_max: int = _s(
        4096, kind="int", group="balancer", minimum=232, maximum=16 + 0xFFFF,
        metavar="BYTES",
        help="the largest v2 PROXY header accepted, TLVs included (a v1 header is at most "
             "107 bytes, always); a larger one closes the connection")
    proxy_header_timeout: float = _s(
        5.0, kind="float", group="balancer", above=0, maximum=3600, metavar="SECONDS",
        help="how long a worker waits for a complete PROXY header on a new connection "
             "before it closes it (the spec suggests at least 3 s, to cover one "
             "retransmission)")
    health_bind: str | None = _s(
        None, kind="bind", group="balancer", optional=True, metavar="SPEC",
        example='"198.18.1.2:8081"',
        help="serve health answers on this address, from the master: HAProxy's agent-check "
             "(ready/drain/maint with a weight from free worker capacity) and HTTP GET "
             "/healthz and /readyz (HOST:PORT, [V6]:PORT, :PORT or unix:PATH; none: off)")
    drain_delay: float = _s(
        0.0, kind="float", group="balancer", minimum=0, maximum=3600, metavar="SECONDS",
        help="on a graceful stop, keep accepting this long after the health answers turn "
             "to drain, so the balancer moves new connections away before any is refused "
             "(the stop then goes on as usual)")
    # -- metrics
    metrics_bind: str | None = _s(
        None, kind="bind", group="metrics", optional=True, metavar="SPEC",
        example='"127.0.0.1:9100"',
        help="serve Prometheus metrics on this address, from the master: HTTP GET /metrics "
             "in the text format 0.0.4 (HOST:PORT, [V6]:PORT, :PORT or unix:PATH; none: "
             "off; the same spec as health_bind: one listener answers both)")
    statsd_host: str | None = _s(
        None, kind="hostport", group="metrics", optional=True, metavar="ADDR:PORT",
        example='"127.0.0.1:8125"',
        help="push the metrics to this statsd server over UDP every statsd_interval "
             "(an IP address and port: the master never waits on DNS; none: off)")
    statsd_prefix: str = _s(
        "forkserver", kind="prefix", group="metrics", maximum=64,
        help="the first part of every statsd name (letters, digits, _ - and dots)")
    statsd_interval: float = _s(
        10.0, kind="float", group="metrics", minimum=0.1, maximum=3600, metavar="SECONDS",
        help="seconds between two statsd pushes")
    # -- workers
    handler: str = _s("", kind="handler", group="workers", metavar="MODULE:CALLABLE",
                      example='"forkserver.examples.echo:handle"',
                      help="the connection handler, module:attribute (required to run)")
    workers: int = _s(factory=_cpu_count, kind="int", group="workers", minimum=1,
                      example="4",
                      maximum=4096, default_text="number of CPUs",
                      help="worker processes to keep running")
    worker_class: Literal["sync", "thread", "asyncio"] | None = _s(
        None, kind="choice", group="workers", choices=("sync", "thread", "asyncio"),
        optional=True,
        help="how a worker runs the handler "
             "(auto: asyncio for coroutine and protocol handlers, else sync)")
    event_loop: Literal["asyncio", "uvloop"] = _s(
        "asyncio", kind="choice", group="workers", choices=("asyncio", "uvloop"),
        help="the event loop of asyncio workers; uvloop needs "
             "pip install 'forkserver[uvloop]'")
    concurrency: int = _s(16, kind="int", group="workers", minimum=1, maximum=100_000,
                          help="connections one thread or asyncio worker serves at once "
                               "(sync workers always serve one)")
    preload: bool = _s(False, kind="bool", group="workers",
                       help="import the handler in the master before forking workers "
                            "(refused with user/group under a root master: the handler "
                            "would run as root)")
    name: str = _s("", kind="str", group="workers", maximum=64,
                   help="instance name shown in process titles and logs")
    # -- limits
    max_requests: int = _s(0, kind="int", group="limits", minimum=0, maximum=2**31 - 1,
                           help="recycle a worker after this many connections (0: never)")
    max_requests_jitter: int = _s(0, kind="int", group="limits", minimum=0,
                                  maximum=2**31 - 1,
                                  help="add up to this many to max_requests, per worker, "
                                       "so workers do not all recycle at once")
    max_memory: int = _s(0, kind="bytes", group="limits", minimum=0, maximum=2**50,
                         metavar="BYTES",
                         help="recycle a worker whose memory exceeds this "
                              "(bytes, or with a K/M/G suffix; 0: never)")
    memory_metric: Literal["rss", "uss"] = _s(
        "rss", kind="choice", group="limits", choices=("rss", "uss"),
        help="which memory figure max_memory compares against")
    # -- lifecycle
    timeout: float = _s(30.0, kind="float", group="lifecycle", above=0, maximum=86400,
                        metavar="SECONDS",
                        help="kill a worker that sends no heartbeat for this long")
    graceful_timeout: float = _s(30.0, kind="float", group="lifecycle", minimum=0,
                                 maximum=86400, metavar="SECONDS",
                                 help="how long a worker asked to stop (a graceful stop, "
                                      "or a retirement: reload, scale-down, recycling, "
                                      "ctl kill) may finish its connections before it is "
                                      "killed")
    startup_timeout: float = _s(60.0, kind="float", group="lifecycle", minimum=0,
                                maximum=86400, metavar="SECONDS",
                                help="exit with status 3 if no worker has become ready this "
                                     "long after the start (a handler that imports in the "
                                     "master's check but fails in every worker); 0: retry "
                                     "for ever")
    pid_file: str | None = _s(None, kind="str", group="lifecycle", optional=True,
                              maximum=MAX_TEXT, metavar="PATH",
                              example='"/run/forkserver.pid"',
                              help="write the master's pid here (refused if a live master "
                                   "holds it)")
    chdir: str | None = _s(None, kind="str", group="lifecycle", optional=True,
                           maximum=MAX_TEXT, metavar="DIR",
                           example='"/srv/app"',
                           help="change to this directory at start, before loading the handler "
                                "(relative paths other than log_file are then taken from it)")
    reload_timeout: float = _s(
        30.0, kind="float", group="lifecycle", above=0, maximum=86400, metavar="SECONDS",
        help="how long the handler check may take: the child that re-reads the "
             "configuration and imports the handler as a worker would, at start and on "
             "each reload (past it: exit 78 at start, reload_failed on a reload)")
    reload: bool = _s(False, kind="bool", group="lifecycle",
                      help="development: watch the handler's source files (and "
                           "reload_extra_files) and reload, as HUP does, when one changes; "
                           "refused with preload (a reload could not load the new code)")
    reload_extra_files: tuple[str, ...] = _s(
        (), kind="paths", group="lifecycle", metavar="PATH,...",
        example='["config/app.toml", "templates/index.html"]',
        help="with reload: more files whose change reloads (a config file, templates, "
             "modules the handler imports from outside its own package)")
    # -- control
    control_socket: str | None = _s(
        None, kind="str", group="control", optional=True, maximum=MAX_TEXT, metavar="PATH",
        example='"/run/forkserver/control.sock"',
        help="the control socket for `forkserver ctl` (none: $RUNTIME_DIRECTORY/control.sock "
             "under systemd, else /run/forkserver/control.sock for root, else "
             "$XDG_RUNTIME_DIR/forkserver/control.sock; with `name` set the directory is "
             "forkserver-NAME)")
    # -- logging
    log_level: Literal["debug", "info", "warning", "error", "critical"] = _s(
        "info", kind="choice", group="logging",
        choices=("debug", "info", "warning", "error", "critical"),
        help="least severe level logged")
    log_format: Literal["text", "json"] = _s(
        "text", kind="choice", group="logging", choices=("text", "json"),
        help="text lines, or one JSON object per line with an 'event' field")
    log_file: str | None = _s(None, kind="str", group="logging", optional=True,
                              maximum=MAX_TEXT, metavar="PATH",
                              example='"/var/log/forkserver.log"',
                              help="append logs to this file, reopened on USR1 (none: stderr)")
    access_log: bool = _s(False, kind="bool", group="logging",
                          help="log one line per connection served")
    access_log_format: str = _s(
        DEFAULT_ACCESS_LOG_FORMAT, kind="format", group="logging", metavar="FORMAT",
        help="the text of each access line, a Python format string over the fields "
             "listener, peer, worker (the slot), pid, duration_ms, status (ok or error), "
             "exc_type (the handler's exception, or -) and error (' (handler error)' after "
             "one, else empty); JSON logs carry the fields themselves")
    # -- security
    user: str | None = _s(None, kind="str", group="security", optional=True, maximum=256,
                          example='"nobody"',
                          help="workers run as this user (name or uid), with its "
                               "supplementary groups")
    group: str | None = _s(None, kind="str", group="security", optional=True, maximum=256,
                           example='"nogroup"',
                           help="workers run as this group (name or gid; none: the user's "
                                "primary group)")
    umask: int = _s(0o022, kind="mode", group="security", minimum=0, maximum=0o777,
                    metavar="OCTAL", default_text="0o022",
                    help="file-creation mask of the master and its workers, set at start")
    # -- hooks: user code, each module:callable (docs/hooks.md)
    on_starting: str = _s(
        "", kind="handler", group="hooks", metavar="MODULE:CALLABLE",
        example='"myapp.hooks:on_starting"',
        help="master, before the listeners open: on_starting(settings), in a short-lived child "
             "with the workers' privileges, within hook_timeout; an error or a timeout stops "
             "the start (exit 78)")
    when_ready: str = _s(
        "", kind="handler", group="hooks", metavar="MODULE:CALLABLE",
        example='"myapp.hooks:when_ready"',
        help="master, once every worker is ready at start: when_ready(status), status being "
             "`ctl status --json`'s object, in a child as on_starting; an error is logged")
    on_reload: str = _s(
        "", kind="handler", group="hooks", metavar="MODULE:CALLABLE",
        example='"myapp.hooks:on_reload"',
        help="master, when a reload has committed: on_reload(old, new), both Settings, in a "
             "child as on_starting; an error is logged")
    pre_exec: str = _s(
        "", kind="handler", group="hooks", metavar="MODULE:CALLABLE",
        example='"myapp.hooks:pre_exec"',
        help="master, on USR2 before the new master is started: pre_exec(settings), in a child "
             "as on_starting; the upgrade waits for it (at most hook_timeout) and goes on "
             "whether it failed or not")
    on_exit: str = _s(
        "", kind="handler", group="hooks", metavar="MODULE:CALLABLE",
        example='"myapp.hooks:on_exit"',
        help="master, as it exits after a stop: on_exit(settings), in a child as on_starting; "
             "an error is logged")
    post_fork: str = _s(
        "", kind="handler", group="hooks", metavar="MODULE:CALLABLE",
        example='"myapp.hooks:post_fork"',
        help="each worker, after the privilege drop and before the handler is imported: "
             "post_fork(worker), worker being a forkserver.WorkerInfo; an error is the "
             "worker's boot failure (the crash back-off applies)")
    post_worker_init: str = _s(
        "", kind="handler", group="hooks", metavar="MODULE:CALLABLE",
        example='"myapp.hooks:post_worker_init"',
        help="each worker, after the handler is loaded and before its first connection: "
             "post_worker_init(worker) (open a database pool, seed a generator); an error is a "
             "boot failure")
    worker_exit: str = _s(
        "", kind="handler", group="hooks", metavar="MODULE:CALLABLE",
        example='"myapp.hooks:worker_exit"',
        help="each worker, on a graceful exit, before its atexit callbacks: "
             "worker_exit(worker, reason); an error is logged and the worker still exits")
    hook_timeout: float = _s(
        30.0, kind="float", group="hooks", above=0, maximum=3600, metavar="SECONDS",
        help="how long a master hook's child may run before it is killed (the master "
             "never waits on a hook in its loop); worker hooks are bounded by timeout and "
             "graceful_timeout instead")
    # -- tls
    tls_certfile: str | None = _s(
        None, kind="str", group="tls", optional=True, maximum=MAX_TEXT, metavar="PATH",
        example='"/etc/forkserver/tls/server.pem"',
        help="serve TLS on every listener that does not set its own: the server certificate "
             "then its chain, PEM (none: plain TCP); the workers run the handshake, the "
             "handler gets the decrypted connection")
    tls_keyfile: str | None = _s(
        None, kind="str", group="tls", optional=True, maximum=MAX_TEXT, metavar="PATH",
        example='"/etc/forkserver/tls/server.key"',
        help="the certificate's private key, PEM (none: it is in tls_certfile); read by "
             "the master, so it may be readable by root only")
    tls_password_file: str | None = _s(
        None, kind="str", group="tls", optional=True, maximum=MAX_TEXT, metavar="PATH",
        example='"/etc/forkserver/tls/key.pass"',
        help="a file holding the password of an encrypted tls_keyfile (one line)")
    tls_cafile: str | None = _s(
        None, kind="str", group="tls", optional=True, maximum=MAX_TEXT, metavar="PATH",
        example='"/etc/forkserver/tls/clients-ca.pem"',
        help="the CA certificates client certificates are checked against (needed by, "
             "and only with, tls_client_auth optional or required)")
    tls_client_auth: Literal["none", "optional", "required"] = _s(
        "none", kind="choice", group="tls", choices=("none", "optional", "required"),
        help="client certificates (mutual TLS): none asks for none; optional checks one "
             "if sent; required refuses a client without a valid one")
    tls_min_version: Literal["TLSv1.2", "TLSv1.3"] = _s(
        "TLSv1.2", kind="choice", group="tls", choices=("TLSv1.2", "TLSv1.3"),
        help="the oldest TLS version accepted (TLS 1.0 and 1.1 are never offered)")
    tls_ciphers: str | None = _s(
        None, kind="str", group="tls", optional=True, maximum=MAX_TEXT, metavar="CIPHERS",
        example='"ECDHE+AESGCM:ECDHE+CHACHA20"',
        help="an OpenSSL cipher string for TLS 1.2 (none: the ssl module's secure "
             "default; TLS 1.3 suites are OpenSSL's own)")
    tls_alpn: tuple[str, ...] = _s(
        (), kind="names", group="tls", metavar="PROTO,...", example='["http/1.1"]',
        help="protocols offered for ALPN, most preferred first (none: no ALPN)")
    tls_handshake_timeout: float = _s(
        5.0, kind="float", group="tls", above=0, maximum=3600, metavar="SECONDS",
        help="how long a client has to finish its TLS handshake before the worker closes "
             "the connection (after the PROXY header, when both are on)")


GROUPS: Final = ("listeners", "workers", "limits", "lifecycle", "control", "logging",
                 "security", "balancer", "hooks", "metrics", "tls")
#: The hook settings run in the master (in a child of it) and in each worker.
MASTER_HOOKS: Final = ("on_starting", "when_ready", "on_reload", "pre_exec", "on_exit")
WORKER_HOOKS: Final = ("post_fork", "post_worker_init", "worker_exit")


def setting_fields() -> list[tuple[str, Setting]]:
    """Every setting, in declaration order, with its metadata."""
    return [(f.name, f.metadata["setting"]) for f in dataclasses.fields(Settings)]


SETTINGS: Final[dict[str, Setting]] = dict(setting_fields())


def env_name(key: str) -> str:
    return SETTINGS[key].env or ENV_PREFIX + key.upper()


def flag_name(key: str) -> str:
    return SETTINGS[key].flag or "--" + key.replace("_", "-")


def default_of(key: str) -> object:
    return getattr(Settings(), key)


# --------------------------------------------------------------- values

class _Invalid(ValueError):
    """A value is wrong; the text says what was expected (no location)."""


def _num(x: float) -> str:
    return str(int(x)) if x == int(x) else str(x)


def _expect(meta: Setting) -> str:
    """What a valid value looks like, for error messages."""
    if meta.kind in ("int", "bytes", "float"):
        noun = {"int": "an integer", "bytes": "a size in bytes (e.g. 512M)",
                "float": "a number"}[meta.kind]
        lo = (f" > {_num(meta.above)}" if meta.above is not None
              else f" >= {_num(meta.minimum)}" if meta.minimum is not None else "")
        hi = f" <= {_num(meta.maximum)}" if meta.maximum is not None else ""
        return noun + (f"{lo} and{hi}" if lo and hi else lo or hi)
    if meta.kind == "choice":
        return "one of " + ", ".join(
            repr(c) for c in meta.choices + (("auto",) if meta.optional else ()))
    return {
        "bool": "true or false",
        "mode": "an octal mode between 0o000 and 0o777",
        "handler": "module:attribute, e.g. myapp.server:handle",
        "listeners": "a bind spec",
        "addresses": "a list of IPv4/IPv6 addresses or CIDR networks (or unix)",
        "bind": "a bind spec: HOST:PORT, [V6]:PORT, :PORT or unix:PATH",
        "paths": f"a list of at most {MAX_WATCHED_FILES} paths",
        "format": "a format string over the access log's fields",
        "hostport": "an IP address and a port, as 127.0.0.1:8125",
        "prefix": "letters, digits, _ and -, in parts joined by dots",
        "names": "a list of names",
    }.get(meta.kind, f"a string of at most {meta.maximum or MAX_TEXT:g} characters")


def _check_range(meta: Setting, value: float) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise _Invalid(f"expected {_expect(meta)}, got {value!r}")
    if ((meta.minimum is not None and value < meta.minimum)
            or (meta.above is not None and value <= meta.above)
            or (meta.maximum is not None and value > meta.maximum)):
        raise _Invalid(f"expected {_expect(meta)}, got {value!r}")


_HANDLER_RE: Final = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_SIZE_RE: Final = re.compile(r"(\d[\d_]*)\s*([KMGT]?)(i?B)?", re.IGNORECASE)
_SIZE_UNIT: Final = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def _check_str(meta: Setting, value: str) -> str | None:
    if meta.optional and value == "":
        return None
    limit = int(meta.maximum or MAX_TEXT)
    if len(value) > limit:
        raise _Invalid(f"expected at most {limit} characters, got {len(value)}")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise _Invalid(f"expected printable text, got {value!r}")
    return value


def _check_choice(meta: Setting, value: str) -> str | None:
    low = value.strip().lower()
    if meta.optional and low in ("auto", ""):
        return None
    found = next((choice for choice in meta.choices if choice.lower() == low), None)
    if found is None:
        raise _Invalid(f"expected {_expect(meta)}, got {value!r}")
    return found


def _check_handler(meta: Setting, value: str) -> str:
    if value and not _HANDLER_RE.fullmatch(value):
        raise _Invalid(f"expected {_expect(meta)}, got {value[:200]!r}")
    return value


def parse_size(text: str) -> int:
    """``512M`` → 536870912 (binary units; a bare number is bytes)."""
    m = _SIZE_RE.fullmatch(text.strip())
    if not m:
        raise _Invalid(f"expected a size in bytes (e.g. 512M), got {text[:200]!r}")
    return int(m.group(1)) * _SIZE_UNIT[m.group(2).upper()]


def parse_bind(text: str) -> str:
    """Check a bind spec with the listeners module; return it unchanged."""
    if not isinstance(text, str) or not text:
        raise _Invalid("expected a bind spec such as 127.0.0.1:8000 or unix:/run/app.sock")
    try:
        listeners.parse_bind(text)
    except (ForkserverError, ValueError) as exc:
        raise _Invalid(str(exc)) from None
    return text


def _number(convert: Callable[[str], float]) -> Callable[[Setting, str], Any]:
    def parse(meta: Setting, text: str) -> Any:
        try:
            value = convert(text.strip())
        except ValueError:
            raise _Invalid(f"expected {_expect(meta)}, got {text[:200]!r}") from None
        _check_range(meta, value)
        return value
    return parse


def _parse_bool(meta: Setting, text: str) -> bool:
    low = text.strip().lower()
    if low not in _TRUE | _FALSE:
        raise _Invalid(f"expected true or false (1/0, yes/no, on/off), got {text[:200]!r}")
    return low in _TRUE


def _parse_size_setting(meta: Setting, text: str) -> int:
    value = parse_size(text)
    _check_range(meta, value)
    return value


def _parse_listeners(meta: Setting, text: str) -> tuple[ListenerSettings, ...]:
    specs = [s for s in re.split(r"[,\s]+", text) if s]
    if len(specs) > MAX_LISTENERS:
        raise _Invalid(f"at most {MAX_LISTENERS} listeners")
    return tuple(ListenerSettings(bind=parse_bind(s)) for s in specs)


def _check_addresses(meta: Setting, entries: Sequence[object]) -> tuple[str, ...]:
    """A ``proxy_allow_from`` list, each entry checked; () when empty (not set)."""
    if len(entries) > MAX_ALLOW_ENTRIES:
        raise _Invalid(f"at most {MAX_ALLOW_ENTRIES} entries, got {len(entries)}")
    if not entries:
        return ()
    from forkserver.proxyallow import AllowListError, compile_allow_list  # noqa: PLC0415

    try:
        allow = compile_allow_list(entries, setting="proxy_allow_from")  # type: ignore[arg-type]
    except AllowListError as exc:
        raise _Invalid(str(exc)) from None
    return allow.entries


def _parse_addresses(meta: Setting, text: str) -> tuple[str, ...]:
    return _check_addresses(meta, [s for s in re.split(r"[,\s]+", text) if s])


def _check_names(meta: Setting, entries: Sequence[object]) -> tuple[str, ...]:
    """A list of short printable names (``tls_alpn``); tls.py checks them further."""
    if len(entries) > MAX_ALLOW_ENTRIES:
        raise _Invalid(f"at most {MAX_ALLOW_ENTRIES} entries, got {len(entries)}")
    for entry in entries:
        if not isinstance(entry, str) or not entry or not entry.isprintable() or len(entry) > 255:
            raise _Invalid(f"expected {_expect(meta)} (strings of 1-255 printable "
                           f"characters), got {entry!r}")  # fmt: skip
    return tuple(entries)  # type: ignore[arg-type]


def _check_health_bind(meta: Setting, text: str) -> str | None:
    """A bind spec the master binds itself: TCP or a Unix path, never an inherited fd."""
    if meta.optional and text.strip() == "":
        return None
    spec = parse_bind(text.strip())
    if listeners.parse_bind(spec).kind not in ("tcp", "unix"):
        raise _Invalid(f"expected {_expect(meta)}, got {text[:200]!r}")
    return spec


def _check_paths(meta: Setting, entries: Sequence[object]) -> tuple[str, ...]:
    if len(entries) > MAX_WATCHED_FILES:
        raise _Invalid(f"at most {MAX_WATCHED_FILES} paths, got {len(entries)}")
    paths = []
    for entry in entries:
        if not isinstance(entry, str) or not entry:
            raise _Invalid(f"expected {_expect(meta)}, got {_toml_type(entry)}")
        paths.append(_check_str(Setting(help="", group="", kind="str"), entry))
    return tuple(str(path) for path in paths)


def _check_format(meta: Setting, text: str) -> str:
    """An access line format: only known fields, and it must format their sample values."""
    import string  # noqa: PLC0415 - only this check parses format strings

    if len(text) > MAX_ACCESS_FORMAT:
        raise _Invalid(f"expected at most {MAX_ACCESS_FORMAT} characters, got {len(text)}")
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError as exc:
        raise _Invalid(f"not a format string: {exc}") from None
    unknown = [name for name in names if name not in ACCESS_LOG_FIELDS]
    if unknown:
        shown = ", ".join(repr(name) for name in dict.fromkeys(unknown))
        raise _Invalid(f"unknown field{'s' if len(unknown) > 1 else ''} {shown} (known: "
                       f"{', '.join(ACCESS_LOG_FIELDS)}; write {{{{ and }}}} for braces)")
    try:
        text.format_map(ACCESS_LOG_FIELDS)
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise _Invalid(f"cannot format the fields: {exc}") from None
    return text


_PREFIX: Final = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def _check_hostport(meta: Setting, text: str) -> str | None:
    """``ADDR:PORT`` or ``[V6]:PORT`` with a numeric address: nothing to resolve."""
    text = text.strip()
    if meta.optional and text == "":
        return None
    host, sep, port = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    try:
        address = ipaddress.ip_address(host)
        number = int(port, 10) if (address.version == 6) == bracketed else 0
    except ValueError:
        number = 0
    if not sep or not 1 <= number <= 65535:
        raise _Invalid(f"expected an IP address and a port, as 127.0.0.1:8125 or [::1]:8125 "
                       f"(no host name: the master never waits on DNS), got {text[:200]!r}")
    return text


def _check_prefix(meta: Setting, text: str) -> str:
    text = text.strip()
    if len(text) > (meta.maximum or 64) or not _PREFIX.fullmatch(text):
        raise _Invalid(f"expected at most {meta.maximum:g} letters, digits, _ and -, in parts "
                       f"joined by dots, got {text[:200]!r}")
    return text


_TEXT_PARSERS: Final[dict[str, Callable[[Setting, str], Any]]] = {
    "int": _number(lambda t: int(t, 10)),
    "float": _number(float),
    "mode": _number(lambda t: int(t, 8)),
    "bytes": _parse_size_setting,
    "bool": _parse_bool,
    "choice": _check_choice,
    "handler": lambda meta, text: _check_handler(meta, text.strip()),
    "listeners": _parse_listeners,
    "addresses": _parse_addresses,
    "names": lambda meta, text: _check_names(meta, [s for s in re.split(r"[,\s]+", text) if s]),
    "bind": _check_health_bind,
    "paths": lambda meta, text: _check_paths(meta, [p for p in text.split(",") if p.strip()]),
    "format": _check_format,
    "hostport": _check_hostport,
    "prefix": _check_prefix,
    "str": _check_str,
}


def parse_text(key: str, text: str) -> Any:
    """Convert the text of an environment variable or command-line option
    to the value of setting *key*; raise ValueError saying what was
    expected.  (For ``listeners`` the text is one or more bind specs,
    separated by commas or whitespace.)"""
    if len(text) > MAX_TEXT * 4:
        raise _Invalid(f"value too long ({len(text)} characters; the limit is {MAX_TEXT * 4})")
    meta = SETTINGS[key]
    return _TEXT_PARSERS[meta.kind](meta, text)


def _from_toml(key: str, value: object) -> Any:
    """Check a value read from TOML for setting *key* (not listeners)."""
    meta = SETTINGS[key]
    if isinstance(value, str) and meta.kind in ("bytes", "mode"):
        return parse_text(key, value)              # "512M", "022"
    if meta.kind in ("addresses", "paths", "names"):
        if not isinstance(value, list):
            raise _Invalid(f"expected an array of strings, got {_toml_type(value)}")
        check = {"addresses": _check_addresses, "paths": _check_paths, "names": _check_names}
        return check[meta.kind](meta, value)
    expected = {"int": int, "bytes": int, "mode": int, "float": int | float,
                "bool": bool}.get(meta.kind, str)
    is_bool = isinstance(value, bool)
    if not isinstance(value, expected) or (is_bool and meta.kind != "bool"):
        raise _Invalid(f"expected {_expect(meta)}, got {_toml_type(value)}")
    if meta.kind in ("int", "bytes", "mode", "float"):
        assert isinstance(value, int | float)
        _check_range(meta, value)
        return float(value) if meta.kind == "float" else value
    if meta.kind == "bool":
        return value
    assert isinstance(value, str)
    return _TEXT_PARSERS[meta.kind](meta, value)


def _toml_type(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
             list: "an array", dict: "a table"}
    noun = names.get(type(value), "a date/time")
    shown = (str(value).lower() if isinstance(value, bool)
             else repr(value) if isinstance(value, int | float | str) else "")
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{noun} {shown}".rstrip()


# --------------------------------------------------------------- sources

@dataclass(frozen=True, slots=True)
class Loaded:
    """Effective settings, and for each key where its value came from:
    ``default``, ``FILE:LINE``, ``env FORKSERVER_X`` or ``command line --x``."""

    settings: Settings
    origins: Mapping[str, str]


def _suggest(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


_TOML_TOKEN: Final = re.compile(
    r'''
      (?P<string>"""(?:[^"\\]|\\.|"{1,2}(?!"))*(?:"{3,5}|\Z)
               |'{3}(?:[^']|'{1,2}(?!'))*(?:'{3,5}|\Z)
               |"(?:[^"\\\n]|\\.)*"?
               |'[^'\n]*'?)
    | (?P<comment>\#[^\n]*)
    | (?P<newline>\n)
    | (?P<bare>[A-Za-z0-9_-]+)
    | (?P<punct>[][{}=,.])
    | (?P<other>[^][{}=,.\n"'\#A-Za-z0-9_-]+)
    ''',
    re.VERBOSE | re.DOTALL,
)


def _check_shape(text: str, path: str) -> None:
    """Refuse a file beyond the shape limits, naming the limit and the line.

    A lexical scan, outside strings and comments: the parts of each
    dotted key (in ``key = value`` and in table headers), the depth of
    ``[`` and ``{`` nesting, the length of each key part and of each
    line.  It only counts: tomllib, which parses the file afterwards,
    has the last word on the syntax.
    """
    scan = _ShapeScan()
    try:
        for match in _TOML_TOKEN.finditer(text):
            scan.take(match)
        scan.line_ends(len(text))
    except _Invalid as exc:
        raise ConfigError(f"{exc}; the file is refused before it is parsed",
                          source=path, line=scan.line) from None  # fmt: skip


class _ShapeScan:
    """The state of ``_check_shape``: where we are, what is open, are we in a key."""

    def __init__(self) -> None:
        self.line, self.line_start = 1, 0
        self.opened: list[str] = []  # "h" a table header, "[" an array, "{" an inline table
        self.in_key, self.parts = True, 1

    def line_ends(self, at: int) -> None:
        if at - self.line_start > MAX_LINE_LENGTH:
            raise _Invalid(f"a line longer than {MAX_LINE_LENGTH} characters (the limit)")

    def take(self, match: re.Match[str]) -> None:
        kind, lexeme = match.lastgroup, match.group()
        if "\n" in lexeme:  # a newline, or a multi-line string
            self.line_ends(match.start())
            self.line += lexeme.count("\n")
            self.line_start = match.start() + lexeme.rindex("\n") + 1
            if kind == "newline" and not self.opened:
                self.in_key, self.parts = True, 1
        elif kind in ("bare", "string") and self.in_key and len(lexeme) > MAX_KEY_LENGTH:
            raise _Invalid(f"a key of {len(lexeme)} characters, over the limit of "
                           f"{MAX_KEY_LENGTH}")  # fmt: skip
        elif kind == "punct":
            self._punctuation(lexeme)

    def _punctuation(self, mark: str) -> None:
        opened = self.opened
        if mark == ".":
            self.parts += 1
            if self.in_key and self.parts > MAX_KEY_PARTS:
                raise _Invalid(f"a dotted key of more than {MAX_KEY_PARTS} parts (the limit)")
        elif mark in "[{":
            header = mark == "[" and self.in_key and all(kind == "h" for kind in opened)
            opened.append("h" if header else mark)
            if len(opened) > MAX_NESTING:
                raise _Invalid(f"arrays and tables nested more than {MAX_NESTING} deep "
                               "(the limit)")  # fmt: skip
            self.in_key, self.parts = mark == "{" or header, 1
        elif mark in "]}":
            if opened:
                opened.pop()
            self.in_key = bool(opened) and opened[-1] == "h"
        else:  # "=" ends a key, "," in an inline table starts one
            self.in_key, self.parts = mark == "," and bool(opened) and opened[-1] == "{", 1


class _TomlSource:
    """A parsed TOML file, with a best-effort key → line index (tomllib
    itself reports lines only for syntax errors)."""

    def __init__(self, path: str) -> None:
        self.path = path
        text = _read_config(path)
        self.lines = text.splitlines()
        _check_shape(text, path)
        try:
            self.data: dict[str, Any] = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            found = re.search(r"line (\d+)", str(exc))
            line = int(found.group(1)) if found else None
            raise ConfigError(f"TOML syntax error: {self._explain(str(exc), line)}",
                              source=path, line=line) from None
        except RecursionError:          # tomllib recurses once per level of nesting
            raise ConfigError("arrays or tables nested too deeply", source=path) from None

    def _explain(self, message: str, line: int | None) -> str:
        """tomllib's *message*, naming the key where tomllib does not."""
        if not message.startswith("Cannot overwrite a value") or line is None:
            return message
        text = self.lines[line - 1] if 0 < line <= len(self.lines) else ""
        key = text.split("=", 1)[0].strip()
        if not key or len(key) > MAX_KEY_LENGTH:
            return message
        return f"key {key!r} is given a value twice (a TOML key can be set only once): {message}"

    def line_of(self, key: str, table_index: int | None = None) -> int | None:
        """Line of top-level *key* (or of a ``[key]`` table), or of *key*
        inside the n-th ``[[listeners]]`` table (of its header if *key* is
        empty), falling back to a top-level ``listeners = [...]``."""
        key_re = re.compile(rf"\s*[\"']?{re.escape(key)}[\"']?\s*=")
        header_re = re.compile(rf"\[+\s*[\"']?{re.escape(key)}[\"']?\s*[\].]")
        top, tables = True, -1
        for number, line in enumerate(self.lines, 1):
            stripped = line.strip()
            if stripped.startswith("["):
                top = False
                if table_index is None and header_re.match(stripped):
                    return number
                if re.fullmatch(r"\[\[\s*listeners\s*\]\]\s*(#.*)?", stripped):
                    tables += 1
                    if table_index is not None and tables == table_index and not key:
                        return number
            elif key_re.match(line) and (
                    (table_index is None and top)
                    or (table_index is not None and tables == table_index)):
                return number
        return self.line_of("listeners") if table_index is not None else None

    def error(self, key: str, message: str, table_index: int | None = None) -> ConfigError:
        sub = key.rsplit(".", 1)[-1] if table_index is not None and "." in key else ""
        return ConfigError(message, source=self.path, key=key,
                           line=self.line_of(sub if table_index is not None else key,
                                             table_index))

    def values(self) -> dict[str, Any]:
        """The settings this file gives, checked."""
        out: dict[str, Any] = {}
        for key, raw in self.data.items():
            if key == "bind":
                raise self.error(key, "unknown setting: in a file, each listener is a "
                                      "[[listeners]] table with bind = \"...\" (put it at the "
                                      "end of the file); --bind and FORKSERVER_BIND take bind "
                                      "specs directly")  # fmt: skip
            if key not in SETTINGS:
                raise self.error(key, "unknown setting" + _suggest(key, list(SETTINGS)))
            try:
                out[key] = (self._listeners(raw) if key == "listeners"
                            else _from_toml(key, raw))
            except _Invalid as exc:
                raise self.error(key, str(exc)) from None
        return out

    def _listeners(self, raw: object) -> tuple[ListenerSettings, ...]:
        if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
            raise _Invalid("expected an array of tables: [[listeners]] with bind = \"...\"")
        if len(raw) > MAX_LISTENERS:
            raise _Invalid(f"at most {MAX_LISTENERS} listeners")
        return tuple(self._listener(i, t) for i, t in enumerate(raw))

    def _listener(self, index: int, table: dict[str, Any]) -> ListenerSettings:
        where = f"listeners[{index}]"
        for key in table:
            if key not in LISTENER_KEYS:
                raise self.error(f"{where}.{key}", "unknown listener option"
                                 + _suggest(key, LISTENER_KEYS), index)
        if "bind" not in table:
            raise self.error(where, "missing 'bind' (a bind spec such as 127.0.0.1:8000)",
                             index)
        checks: dict[str, Callable[[Any], Any]] = {
            "bind": parse_bind,
            "name": lambda v: _check_str(SETTINGS["name"], v),
            "backlog": lambda v: _from_toml("backlog", v),
            "dispatch": lambda v: _from_toml("dispatch", v),
            "proxy_protocol": lambda v: _from_toml("proxy_protocol", v),
            "proxy_allow_from": lambda v: _from_toml("proxy_allow_from", v),
            "defer_accept": lambda v: _from_toml("defer_accept", v),
        }
        values: dict[str, Any] = {}
        tls: list[tuple[str, Any]] = []
        for key, value in table.items():
            try:
                if key in LISTENER_TLS_KEYS:
                    tls.append((key, _listener_tls(key, value)))
                    continue
                if key not in _LISTENER_NOT_STR and not isinstance(value, str):
                    raise _Invalid(f"expected a string, got {_toml_type(value)}")
                values[key] = checks[key](value)
            except _Invalid as exc:
                raise self.error(f"{where}.{key}", str(exc), index) from None
        values["name"] = values.get("name") or ""
        return ListenerSettings(**values, tls=tuple(tls))


def _listener_tls(key: str, value: object) -> Any:
    """A [[listeners]] table's own TLS key, checked as the global one is.

    ``tls_certfile = ""`` turns TLS off on that listener; ``tls_certificates``
    (SNI) exists only per listener: each entry becomes a ``tls.TlsCertificate``.
    """
    if key == "tls_certfile" and value == "":
        return ""
    if key != "tls_certificates":
        return _from_toml(key, value)
    from forkserver.tls import TlsCertificate, TlsConfigError  # noqa: PLC0415 (ssl: only here)

    if not isinstance(value, list) or not all(isinstance(entry, dict) for entry in value):
        raise _Invalid("expected an array of tables: [[listeners.tls_certificates]] with "
                       "server_names and certfile")  # fmt: skip
    if len(value) > MAX_LISTENERS:
        raise _Invalid(f"at most {MAX_LISTENERS} certificates")
    try:
        return tuple(TlsCertificate.from_mapping(entry, f"tls_certificates[{number}]")
                     for number, entry in enumerate(value))  # fmt: skip
    except TlsConfigError as exc:
        raise _Invalid(str(exc)) from None


def _read_config(path: str) -> str:
    """The text of the config file: a regular file, opened without blocking.

    A FIFO, a device or a socket at the path is refused before a single
    byte is read: opening or reading one could block forever.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise ConfigFileNotFound("config file not found", source=path) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror}", source=path) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"is {_file_kind(mode)}, expected a regular TOML file",
                              source=path)  # fmt: skip
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_FILE_BYTES and (chunk := os.read(fd, MAX_FILE_BYTES + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror}", source=path) from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"config file larger than {MAX_FILE_BYTES} bytes", source=path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError("not UTF-8 text", source=path, line=line) from None


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))  # fmt: skip
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _env_values(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    by_env = {env_name(k): k for k in SETTINGS}
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name.startswith(ENV_RESERVED_PREFIX):
            continue
        key = by_env.get(name)
        if key is None:
            raise ConfigError("unknown setting" + _suggest(name, list(by_env)),
                              source="environment", key=name)
        try:
            values[key] = parse_text(key, environ[name])
        except ValueError as exc:
            raise ConfigError(str(exc), source="environment", key=name) from None
        origins[key] = f"env {name}"
    return values, origins


def load(config_file: str | None = None, environ: Mapping[str, str] | None = None,
         overrides: Mapping[str, Any] | None = None, *,
         overrides_source: str | None = None) -> Loaded:
    """Merge defaults < *config_file* < *environ* < *overrides* (values
    already checked by the command line, keyed by field name; or by
    :func:`load_values`, which names itself as *overrides_source*)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    origins: dict[str, str] = dict.fromkeys(SETTINGS, "default")
    if config_file is not None:
        source = _TomlSource(config_file)
        for key, value in source.values().items():
            values[key] = value
            line = source.line_of(key) if key != "listeners" else source.line_of("", 0)
            origins[key] = f"{config_file}:{line}" if line else config_file
    env_values, env_origins = _env_values(environ)
    values.update(env_values)
    origins.update(env_origins)
    for key, value in (overrides or {}).items():
        if key not in SETTINGS:
            raise ConfigError("unknown setting", source="command line", key=key)
        values[key] = value
        origins[key] = (f"command line {flag_name(key)}" if overrides_source is None
                        else f"{overrides_source} {key}")
    settings = Settings(**values)
    settings = dataclasses.replace(settings, listeners=tuple(
        dataclasses.replace(
            ls,
            backlog=settings.backlog if ls.backlog is None else ls.backlog,
            dispatch=settings.dispatch if ls.dispatch is None else ls.dispatch,
            proxy_protocol=(settings.proxy_protocol if ls.proxy_protocol is None
                            else ls.proxy_protocol),
            proxy_allow_from=(settings.proxy_allow_from if ls.proxy_allow_from is None
                              else ls.proxy_allow_from),
            defer_accept=settings.defer_accept if ls.defer_accept is None else ls.defer_accept,
        )
        for ls in settings.listeners))
    _check_proxy_listeners(settings, origins)
    if settings.reload and settings.preload:
        raise ConfigError("reload = true with preload = true: the handler imported once in "
                          "the master cannot be imported again, so a change would never "
                          "serve; turn preload off for development",
                          source=origins["reload"], key="reload")  # fmt: skip
    return Loaded(settings, origins)


def _check_proxy_listeners(settings: Settings, origins: Mapping[str, str]) -> None:
    """Refuse a listener that requires a PROXY header but trusts no one to send it.

    Without ``proxy_allow_from`` the header would have to be taken from
    anyone, which lets any client claim any address.
    """
    tables: Sequence[ListenerSettings] = settings.listeners or (ListenerSettings(
        bind="the default listener", proxy_protocol=settings.proxy_protocol,
        proxy_allow_from=settings.proxy_allow_from),)  # fmt: skip
    for index, table in enumerate(tables):
        if table.proxy_protocol in (None, "off") or table.proxy_allow_from:
            continue
        where = (f"listener {table.name or table.bind!r}" if settings.listeners
                 else "the default listener (127.0.0.1:8000, or systemd's sockets)")
        origin = origins.get("listeners" if settings.listeners else "proxy_protocol", "")
        raise ConfigError(
            f"{where} requires a PROXY {table.proxy_protocol} header "
            "(proxy_protocol) but proxy_allow_from is not set: list the addresses or "
            "networks of the load balancers that may send it (and 'unix' for a Unix "
            "listener)", source=origin if origin != "default" else "",
            key=f"listeners[{index}].proxy_allow_from" if settings.listeners
            else "proxy_allow_from")  # fmt: skip


def load_values(values: Mapping[str, object], *, config_file: str | None = None,
                environ: Mapping[str, str] | None = None,
                source: str = "arguments") -> Loaded:
    """Settings from Python values (the embedding API), checked as a file's are.

    *values* are keyed by setting (``bind`` too, for ``listeners``): a
    ``str``, ``int``, ``float``, ``bool`` or sequence as TOML would give
    it, None for an optional setting left unset; ``listeners`` (or
    ``bind``) a bind spec, or a sequence of bind specs,
    ``ListenerSettings`` or mappings with the keys of a ``[[listeners]]``
    table.  They win over *config_file* and *environ* (default: no
    environment at all).  Raises ``ConfigError`` naming *source* and the key.
    """
    checked: dict[str, Any] = {}
    for name, value in values.items():
        key = "listeners" if name == "bind" else name
        if key not in SETTINGS:
            raise ConfigError("unknown setting" + _suggest(key, list(SETTINGS)),
                              source=source, key=name)  # fmt: skip
        try:
            checked[key] = _python_value(key, value)
        except _Invalid as exc:
            raise ConfigError(str(exc), source=source, key=name) from None
    return load(config_file, {} if environ is None else environ, checked,
                overrides_source=source)  # fmt: skip


def _python_value(key: str, value: object) -> Any:
    meta = SETTINGS[key]
    if key == "listeners":
        items = [value] if isinstance(value, str | ListenerSettings | Mapping) else value
        if not isinstance(items, Sequence):
            raise _Invalid(f"expected a bind spec or a list of them, got {_toml_type(value)}")
        if len(items) > MAX_LISTENERS:
            raise _Invalid(f"at most {MAX_LISTENERS} listeners")
        return tuple(_python_listener(index, item) for index, item in enumerate(items))
    if value is None and (meta.optional or meta.kind == "handler"):
        return None if meta.optional else ""
    if isinstance(value, tuple):
        value = list(value)
    return _from_toml(key, value)


def _python_listener(index: int, item: object) -> ListenerSettings:
    if isinstance(item, str):
        return ListenerSettings(bind=parse_bind(item))
    if isinstance(item, ListenerSettings):  # its fields, and its own tls_* keys as given
        own = LISTENER_KEYS[:-len(LISTENER_TLS_KEYS)]
        item = {**{k: v for k in own if (v := getattr(item, k)) is not None},
                **dict(item.tls)}  # fmt: skip
    if not isinstance(item, Mapping):
        raise _Invalid(f"listener {index}: expected a bind spec, a ListenerSettings or a "
                       f"mapping, got {_toml_type(item)}")  # fmt: skip
    unknown = [k for k in item if k not in LISTENER_KEYS]
    if unknown or "bind" not in item:
        what = (f"unknown listener option {unknown[0]!r}" + _suggest(str(unknown[0]),
                LISTENER_KEYS) if unknown else "missing 'bind'")  # fmt: skip
        raise _Invalid(f"listener {index}: {what}")
    fields: dict[str, Any] = {}
    tls: list[tuple[str, Any]] = []
    for k, v in item.items():
        try:
            if k == "bind":
                fields[k] = parse_bind(v)
            elif k == "name":
                fields[k] = _check_str(SETTINGS["name"], v) if isinstance(v, str) else \
                    _from_toml("name", v)  # fmt: skip
            elif k == "tls_certificates":
                tls.append((k, _python_certificates(v)))
            elif k in LISTENER_TLS_KEYS:
                tls.append((k, _listener_tls(k, list(v) if isinstance(v, tuple) else v)))
            else:
                fields[k] = _from_toml(k, list(v) if isinstance(v, tuple) else v)
        except _Invalid as exc:
            raise _Invalid(f"listener {index}, {k}: {exc}") from None
    fields["name"] = fields.get("name") or ""
    return ListenerSettings(**fields, tls=tuple(tls))


def _python_certificates(value: object) -> Any:
    """``tls_certificates`` from Python: ``TlsCertificate`` objects (checked when
    made), or mappings checked as TOML tables are."""
    from forkserver.tls import TlsCertificate  # noqa: PLC0415 (ssl: only here)

    entries = list(value) if isinstance(value, (list, tuple)) else value
    if isinstance(entries, list) and entries and \
            all(isinstance(entry, TlsCertificate) for entry in entries):  # fmt: skip
        return tuple(entries)
    if isinstance(entries, list):
        entries = [dict(entry) if isinstance(entry, Mapping) else entry for entry in entries]
    return _listener_tls("tls_certificates", entries)


def load_settings(config_file: str | None = None, environ: Mapping[str, str] | None = None,
                  overrides: Mapping[str, Any] | None = None) -> Settings:
    """:func:`load` without the origins."""
    return load(config_file, environ, overrides).settings


# --------------------------------------------------------------- documentation
# config/forkserver.toml and docs/configuration.md are rendered from the
# declarations above; tests/test_config_docs.py fails when either drifts.

GROUP_TITLES: Final = {
    "listeners": "Listeners: where connections come from",
    "workers": "Workers: what runs the handler, and how many",
    "limits": "Limits: when a worker is recycled",
    "lifecycle": "Lifecycle: timeouts, pid file, working directory",
    "control": "Control: the socket behind `forkserver ctl`",
    "logging": "Logging",
    "security": "Security: who the workers run as",
    "balancer": "Behind a load balancer: PROXY protocol, health answers, drain",
    "hooks": "Hooks: your code at points of the daemon's life",
    "metrics": "Metrics: Prometheus and statsd",
    "tls": "TLS: encrypted listeners",
}

_SYSTEMD_NOTE: Final = """\
Nothing to set: under systemd forkserver uses the sockets systemd passes
(LISTEN_FDS / LISTEN_FDNAMES) when no listener is configured, reports
READY/RELOADING/STOPPING/STATUS through NOTIFY_SOCKET (Type=notify),
answers the watchdog, logs with journald priorities, and puts the
control socket in $RUNTIME_DIRECTORY."""


_TLS_NOTE: Final = """\
A listener serves TLS when `tls_certfile` applies to it: its own (in its
`[[listeners]]` table) or the global one.  A `[[listeners]]` table may set
every `tls_*` key for itself (`tls_certfile = ""` turns TLS off there),
and list more certificates chosen by the server name the client asks
for (SNI): exact names win over `*.example.com` wildcards (one label);
any other name, and a client without SNI, gets `tls_certfile`.

```toml
[[listeners]]
bind = "0.0.0.0:8443"
tls_certfile = "/etc/forkserver/tls/web.pem"
tls_keyfile = "/etc/forkserver/tls/web.key"
tls_alpn = ["http/1.1"]

[[listeners.tls_certificates]]
server_names = ["api.example.com"]
certfile = "/etc/forkserver/tls/api.pem"
keyfile = "/etc/forkserver/tls/api.key"
```

The master reads and checks every file before it forks a worker (and
before workers drop to `user`, so a key readable by root only works):
a missing, unreadable, malformed, mismatched, expired or not yet valid
file stops the start with exit 78 naming the listener, the setting, the
file and the reason; `check-config` reports the same.  A reload (HUP,
`forkserver ctl reload`) reads the files again for the new generation:
a bad file is `reload_failed` with the reason (and `ctl reload` exits
1), and the running workers go on with the certificates they have.  The
global `tls_*` settings change on a reload; a listener's own keys stay
until a restart or USR2, like the rest of the listener, but its files
are re-read.

The handshake runs in the worker, after the PROXY header when both are
on a listener (the header comes first, in clear text), within
`tls_handshake_timeout`; the handler only ever gets connections whose
handshake completed.  A failed handshake (plain text, an old TLS
version, an untrusted client certificate, a stall) is closed, counted
per listener (`forkserver ctl status`: handshakes done and failed) and
logged at INFO (`tls_handshake_failed`, at most once per 10 s per
listener and reason, with the peer and OpenSSL's reason).  A Unix
listener may serve TLS too (a client then has no address to check the
certificate against, so give it the name to verify).

What the handler sees, by form: a plain function or a socketserver
handler (sync and thread workers) gets an `ssl.SSLSocket` (`conn`,
`self.request`) and `forkserver.tls_info()` returns a
`forkserver.TlsInfo` (`version`, `cipher`, `cipher_bits`, `alpn`,
`server_name`, `peer_certificate` as `getpeercert()` gives it,
`peer_certificate_der`); an asyncio stream handler gets TLS streams
(`writer.get_extra_info("ssl_object")`) and `forkserver.tls_info()` too;
an `asyncio.Protocol` asks its transport, in `connection_made` or later:
`forkserver.handshake.connection_info(transport)`.  With the PROXY
protocol on as well, `forkserver.proxy_info()` works as without TLS.

Key material: each worker holds the loaded keys in its memory, as any
TLS server process does; anything that can read a worker's memory (the
handler, or whatever can ptrace that user's processes) can read them.
Workers on TLS listeners therefore run with core dumps off
(`RLIMIT_CORE` 0), so a crash leaves no key in a core file."""


_CTL_NOTE: Final = """\
## `forkserver ctl`

`forkserver ctl [--socket PATH | -c FILE | --name NAME] COMMAND` talks
to the master over the control socket.  `run`, `ctl` and `check-config`
place it by one rule: `control_socket`; else
`$RUNTIME_DIRECTORY/control.sock` (under systemd); else
`/run/forkserver/control.sock` for root (where the shipped unit's
`RuntimeDirectory=` puts it); else `$XDG_RUNTIME_DIR/forkserver/control.sock`,
or `/tmp/forkserver-UID/control.sock` without `XDG_RUNTIME_DIR`.  With
`name` set the directory is `forkserver-NAME`.  A missing directory is
created mode 0700.  When the default path is taken (a second daemon with
no configuration) the daemon logs `control_unavailable` and runs without
a control socket; a `control_socket` that is taken stops the start.
The socket is mode 0600 and the master checks the peer's credentials:
only root and the daemon's own user are served; anyone else is refused
and logged (event `control_denied`).

| Command | Does |
|---|---|
| `status [--json]` | the master and a table of workers; `--json`: stable JSON |
| `reload` | as HUP; answers once the new generation serves, or exits 1 and says why |
| `scale N\\|+N\\|-N` | run N workers, or N more or fewer (never fewer than 1) |
| `kill SLOT\\|PID` | retire that worker: it finishes, a successor starts now |
| `kill SLOT\\|PID --signal NAME` | send it TERM, QUIT, ABRT or KILL instead |
| `stop [--graceful\\|--fast]` | stop; graceful (the default) lets workers finish |
| `reopen-logs` | reopen `log_file` after rotation (as USR1) |
| `metrics [-o FILE]` | the metrics as `GET /metrics` answers (docs/metrics.md), or to FILE |

`status --json` sorts its keys and carries `"schema": 1`; keys are only
ever added, never renamed.  Exit codes: 0 done; 1 the daemon rejected the command (the reason is
printed); 64 bad command line; 69 no daemon at the socket; 70 a
malformed reply; 73 `metrics --output` cannot write its file; 75 no
reply within `--timeout`; 77 refused (file mode or peer credentials);
78 invalid configuration (with `-c`)."""


def toml_value(key: str, value: object) -> str:  # noqa: PLR0911 (one per kind of value)
    """*value* of setting *key* written as TOML (None as the empty string)."""
    if SETTINGS[key].kind == "mode" and isinstance(value, int):
        return f"0o{value:03o}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if value is None:
        return '"auto"' if SETTINGS[key].kind == "choice" else '""'
    if isinstance(value, tuple) and SETTINGS[key].kind in ("addresses", "paths", "names"):
        return "[" + ", ".join(toml_value("name", entry) for entry in value) + "]"
    if isinstance(value, tuple):
        return "[" + ", ".join(
            "{ " + ", ".join([f'{k} = {toml_value(k if k in SETTINGS else "name", v)}'
                              for k in LISTENER_KEYS[:-len(LISTENER_TLS_KEYS)]
                              if (v := getattr(item, k)) is not None]
                             + [f"{k} = {_tls_toml(k, v)}" for k, v in item.tls]) + " }"
            for item in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tls_toml(key: str, value: object) -> str:
    if key != "tls_certificates":
        return toml_value(key, value) if value != "" else '""'
    assert isinstance(value, tuple)
    return "[" + ", ".join("{ " + ", ".join(
        f"{name} = {toml_value('tls_alpn' if name == 'server_names' else 'name', v)}"
        for name in ("server_names", "certfile", "keyfile", "password_file")
        if (v := getattr(entry, name)) is not None) + " }" for entry in value) + "]"


def _comment(text: str, width: int = 76) -> list[str]:
    import textwrap  # noqa: PLC0415 - only the docs renderers need it

    return ["# " + line for line in textwrap.wrap(text, width - 2)]


def _listener_example() -> list[str]:
    return [
        "",
        "# ---- listeners (continued)",
        "# Each [[listeners]] table is one listening socket. They come last because",
        "# in TOML every key after a table header belongs to that table. With none,",
        "# forkserver uses the systemd sockets if systemd passed any, else",
        "# 127.0.0.1:8000.",
        "#",
        "# [[listeners]]",
        '# bind = "127.0.0.1:8000"    # HOST:PORT, [V6]:PORT, :PORT, unix:PATH,',
        "#                            # fd://N, systemd, systemd:NAME",
        '# name = "web"               # shown in logs and `forkserver ctl status`',
        "# backlog = 2048             # this listener's listen() backlog",
        '# dispatch = "master"        # or "shared": workers accept themselves',
        "#                            # (default: the dispatch setting)",
        '# proxy_protocol = "v2"      # "off", "v1" or "v2" (default: the',
        "#                            # proxy_protocol setting)",
        '# proxy_allow_from = ["198.18.0.2"]  # who may send the header',
        "#                            # (default: the proxy_allow_from setting)",
        "# defer_accept = 0           # seconds to wait for a TCP client's first bytes",
        "#                            # (default: the defer_accept setting)",
        '# tls_certfile = "/etc/forkserver/tls/web.pem"  # TLS on this listener;',
        "#                            # every tls_* setting can be set here, \"\"",
        "#                            # turns TLS off (default: the tls_* settings)",
        "# [[listeners.tls_certificates]]  # SNI: served to clients asking these names",
        '# server_names = ["api.example.com", "*.api.example.com"]',
        '# certfile = "/etc/forkserver/tls/api.pem"',
        '# keyfile = "/etc/forkserver/tls/api.key"',
        "#",
        "# [[listeners]]",
        '# bind = "unix:/run/forkserver/app.sock"',
        '# name = "local"',
    ]


def render_example_toml() -> str:
    """The text of config/forkserver.toml."""
    out = [
        "# forkserver configuration: every setting, at its default.",
        "#",
        "# Precedence, lowest first: built-in defaults < this file",
        "# (forkserver run -c FILE) < FORKSERVER_<KEY> environment variables <",
        "# command-line options.  Settings that are off by default are shown",
        "# commented out, with an example value.  Check a file with",
        "#     forkserver check-config -c FILE",
        "# which prints every effective value and where it came from.",
        "# (Rendered from forkserver/config.py; docs/configuration.md has the",
        "# same settings as tables.)",
    ]
    for group in (*GROUPS[:3], "lifecycle", "systemd", *GROUPS[4:]):
        out += ["", f"# ---- {group}"]
        if group == "systemd":
            out += ["# " + line if line else "#" for line in _SYSTEMD_NOTE.splitlines()]
            continue
        for key, meta in setting_fields():
            if meta.group != group or key == "listeners":
                continue
            default = default_of(key)
            out += _comment(meta.help + (f" (default: {meta.default_text})"
                                         if meta.default_text else ""))
            if meta.example and (default in (None, "", ()) or meta.default_text):
                out.append(f"# {key} = {meta.example}")
            else:
                out.append(f"{key} = {toml_value(key, default)}")
    out += _listener_example()
    return "\n".join(out) + "\n"


def _type_text(meta: Setting) -> str:
    text = _expect(meta)
    text = re.sub(r"^(an?|one of) ", lambda m: "" if m.group(1) != "one of" else "one of ",
                  text)
    return text + (" (empty: none)" if meta.optional and meta.kind == "str" else "")


def render_markdown() -> str:
    """The text of docs/configuration.md."""
    out = [
        "# Configuration",
        "",
        "<!-- Rendered from forkserver/config.py by render_markdown(); "
        "tests/test_config_docs.py checks it. -->",
        "",
        "Every setting can be given in four places; a later one wins:",
        "",
        "1. the built-in default;",
        "2. the TOML file named with `-c FILE` (see `config/forkserver.toml`);",
        "3. the environment variable `FORKSERVER_<KEY>` (the key in upper case);",
        "4. the command-line option of `forkserver run`.",
        "",
        "`forkserver check-config -c FILE [options]` makes every check `run`",
        "makes before its first fork (the handler is imported in a child, as",
        "the workers' user, within `reload_timeout`; only the listeners are",
        "not opened), refuses what `run` refuses with the same message and",
        "exit code, and prints each effective value with where it came from.",
        "Errors name the file, the key (and line) and what was expected, and",
        "exit with 78 (invalid configuration), 66 (config file missing) or",
        "64 (bad command line).  A reload (HUP or `forkserver ctl reload`)",
        "re-reads the same file and environment with the same command line,",
        "in a child process off the master's loop; if that fails, the daemon",
        "keeps its running settings and workers and logs why (event",
        "`reload_failed`).",
        "",
        "The file must be a regular file of at most 1 MiB (a FIFO or a device",
        "is refused without reading it), and is refused before it is parsed if",
        f"a dotted key has more than {MAX_KEY_PARTS} parts, arrays and tables nest more",
        f"than {MAX_NESTING} deep, a key is longer than {MAX_KEY_LENGTH} characters or a line",
        f"longer than {MAX_LINE_LENGTH}; the error names the limit and the line.",
        "",
        "Booleans in the environment accept 1/0, true/false, yes/no, on/off.",
        "An empty environment value turns an optional setting off.",
        "",
    ]
    for group in GROUPS:
        out += [f"## {GROUP_TITLES[group]}", "",
                "| Key | Type | Default | Environment | Option | Meaning |",
                "|---|---|---|---|---|---|"]
        for key, meta in setting_fields():
            if meta.group != group:
                continue
            default = meta.default_text or (toml_value(key, default_of(key))
                                            if key != "listeners" else "none")
            option = "`HANDLER` argument" if key == "handler" else f"`{flag_name(key)}`"
            out.append(f"| `{key}` | {_type_text(meta)} | `{default}` | `{env_name(key)}` "
                       f"| {option} | {meta.help.replace('|', '/')} |")
        out.append("")
        if group == "listeners":
            out += [
                "In the file, each listener is a table of the array `listeners`,",
                "with `bind` (required), `name`, `backlog`, `dispatch`,",
                "`proxy_protocol`, `proxy_allow_from` and `defer_accept` (all but",
                "`bind` and `name` default to the global settings of the same name):",
                "",
                "```toml",
                "[[listeners]]",
                'bind = "127.0.0.1:8000"',
                'name = "web"',
                "backlog = 1024",
                'dispatch = "shared"',
                "defer_accept = 5",
                "```",
                "",
                "With `dispatch = \"shared\"` the master never accepts on that",
                "listener: every worker holds the listening socket and accepts",
                "while it has room (a sync worker one connection at a time).  It",
                "costs less CPU per connection than master dispatch, and gives up",
                "what the master adds: least-loaded dispatch (the kernel decides",
                "which waiting worker wakes), the master's queue of accepted",
                "connections, and `max_pending_connections` (what waits stays in",
                "the kernel backlog).  A worker that dies loses only the",
                "connections it had accepted.  See docs/performance.md.",
                "",
                "With `defer_accept = N` (a TCP listener; Linux's",
                "`TCP_DEFER_ACCEPT`, nginx's `deferred`) the kernel keeps a new",
                "connection until its client has sent something, or for about N",
                "seconds (rounded up to its SYN-ACK retransmission schedule), and",
                "only then lets it be accepted: a sync worker is never handed a",
                "client that has not spoken yet.  Leave it 0 for a protocol where",
                "the server speaks first: its clients would wait that long for the",
                "greeting.  Like every listener setting it takes effect when the",
                "listener is opened (start, USR2), not on reload.",
                "",
                "`FORKSERVER_BIND` takes one or more bind specs separated by commas",
                "or spaces; `--bind` can be repeated.  Either replaces the file's",
                "listeners entirely.",
                "",
            ]
        if group == "balancer":
            out += [
                "A listener with `proxy_protocol = \"v1\"` or `\"v2\"` requires that",
                "header first on every connection, as the PROXY protocol's spec",
                "says a receiver must: it is never guessed (a client that reaches",
                "the port directly could otherwise claim any address), so HAProxy's",
                "`send-proxy`/`send-proxy-v2`, nginx `proxy_protocol on` or the",
                "cloud balancer must be configured to match.  The worker, never the",
                "master, reads it: first it checks the socket's peer against",
                "`proxy_allow_from`, then it reads the header within",
                "`proxy_header_timeout` (v1 at most 107 bytes, v2 at most",
                "`proxy_header_max`), and only then runs the handler, whose `peer` is",
                "the client the header names.  A v2 `LOCAL` header (a balancer's",
                "own health check) is served with the socket's addresses.  A",
                "connection from a peer not listed, or with a malformed, truncated,",
                "oversized or late header is closed before the handler runs, counted",
                "per listener and reason (`forkserver ctl status`), and logged",
                "(`proxy_refused`, at most once per 10 s per listener and reason).",
                "A PROXY listener without `proxy_allow_from` is refused (exit 78).",
                "See docs/scale-out.md for balancer configurations.",
                "",
                "`health_bind` opens a small listener in the master that answers",
                "HAProxy's `agent-check` (one line: `ready NN%`, `drain` or `maint`)",
                "and HTTP `GET /healthz` (200 while the master runs) and `GET",
                "/readyz` (200 while a worker is ready and no stop has begun, else",
                "503).  It reads at most one short request per client, with a",
                "deadline, and never blocks the master.  `drain_delay` keeps the",
                "listeners accepting that long after a graceful stop began and the",
                "health answers turned to `drain`.",
                "",
                "A reload applies `proxy_header_max`, `proxy_header_timeout` and",
                "`drain_delay`.  `proxy_protocol` and `proxy_allow_from` belong to",
                "each listener (filled in from the global ones), and like the rest",
                "of a listener stay as they are until a restart or USR2 (the reload",
                "says `reload_listeners_kept`), unless no listener is configured",
                "at all (the default bind, or systemd's sockets without `--bind`).",
                "`health_bind` too takes a restart or USR2.",
                "",
            ]
        if group == "metrics":
            out += [
                "`metrics_bind` opens a listener in the master that answers `GET",
                "/metrics` (and `HEAD`) with every counter and gauge in Prometheus's",
                "text format 0.0.4; any other path is a 404, any other method a",
                "405.  It reads one request of at most 8 KiB per client, drops a",
                "client after 2 s whatever it does, serves at most 64 at once, and",
                "renders at most once per 0.1 s, so no client can block or load the",
                "master.  Set it to the very spec of `health_bind` and one listener",
                "answers `/healthz`, `/readyz`, `/metrics` and the agent-check;",
                "two different specs are two listeners.  `forkserver ctl metrics`",
                "prints the same text, for node_exporter's textfile collector or a",
                "host where no port may be opened.  Every metric is in",
                "docs/metrics.md.",
                "",
                "`statsd_host` pushes the same figures, counters as the change since",
                "the last push and gauges as they are, in datagrams of at most 1432",
                "bytes from a non-blocking UDP socket; a send that fails is counted",
                "and logged (`statsd_failed`, at most once a minute), never retried.",
                "A reload applies `statsd_host`, `statsd_prefix` and",
                "`statsd_interval`; `metrics_bind` takes a restart or USR2.",
                "",
            ]
        if group == "tls":
            out += [*_TLS_NOTE.splitlines(), ""]
        if group == "security":
            out += [
                "Workers drop to `user`/`group` right after fork, before the handler",
                "is imported, and set their parent-death signal after the drop.  The",
                "master keeps the uid it was started with: it may need root to bind",
                "a privileged port again or to re-execute itself on USR2, and it never",
                "runs handler code.  The handler check at start and on each reload",
                "drops privileges the same way, with every descriptor of the master",
                "closed, before it imports the handler.  `preload` together with",
                "`user`/`group` under a root master is refused (exit 78): the master",
                "would import the handler as root; turn preload off, or run the",
                "master as the user.  A master that cannot switch to `user`/`group`",
                "(not root, no CAP_SETUID/CAP_SETGID, and not already that user) is",
                "refused at start, on reload and by `check-config`.",
                "",
                "Every worker also sets `PR_SET_NO_NEW_PRIVS`, so neither it nor",
                "anything it executes can gain privileges through a setuid or",
                "file-capability binary; a worker that leaves root empties its",
                "capability bounding set first.  A worker that stays root (no",
                "`user`) keeps root's capabilities.  Workers run with their soft",
                "`RLIMIT_NOFILE` lowered by the descriptors one channel message can",
                "carry, a reserve that lets a worker at its limit hand back what it",
                "has not received instead of losing it.  Under systemd, prefer",
                "`User=`/`DynamicUser=` and socket activation, so that no process of",
                "the service is root.",
                "",
                "The workers' user must be able to read Python and the handler's",
                "code: the daemon loads its own modules before the drop, but a",
                "handler that imports a module late (inside a function) imports it",
                "as `user`.  A Python under a home directory only root can enter",
                "(`/root/.pyenv`, say) fails there; install it, or the virtualenv,",
                "where `user` can read it (`/opt`, `/usr/local`).",
                "",
            ]
        if group == "hooks":
            out += [
                "Each hook is `module:callable`, imported where it runs, never in",
                "the master itself: a master hook runs in a short-lived child of",
                "the master that has dropped to `user`/`group` and closed the",
                "master's descriptors (as the handler check does), killed past",
                "`hook_timeout`; a worker hook runs in the worker, after its",
                "privilege drop.  So no hook runs as root when `user` is set, and",
                "none can change the master: hooks observe.  docs/hooks.md says",
                "when each one runs, with what, and what a failure or a hang does.",
                "",
            ]
    out += ["## systemd", "", *_SYSTEMD_NOTE.splitlines(), "", *_CTL_NOTE.splitlines(), ""]
    return "\n".join(out)
