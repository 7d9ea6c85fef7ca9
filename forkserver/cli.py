"""The ``forkserver`` command line.

``forkserver run [options] [HANDLER]``
    run the daemon; every option comes from the settings model
    (``forkserver.config.Settings``), so ``run --help`` lists them all.
``forkserver check-config [-c FILE] [options] [HANDLER]``
    validate, then print the effective settings and where each came from.
``forkserver ctl [--socket PATH | -c FILE | --name NAME] COMMAND``
    talk to a running master over its control socket (found by the rule
    of ``forkserver.control.socket_path``, as ``run`` places it).
``forkserver --version``
    the installed version.

This is the one module that turns errors into exit codes (sysexits.h):
64 bad command line, 66 missing config file, 78 invalid configuration;
``ctl`` adds 1 (command failed), 69 (no daemon), 70 (malformed reply),
75 (no reply in time), 77 (refused) and 73 (``ctl metrics --output`` cannot
write its file).  ``run`` passes on the master's
own: 0 after a stop, 3 when no worker became ready within
``startup_timeout``, 69 when a listener cannot be opened, 78 when the
handler or the user/group is unusable.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import enum
import importlib.metadata
import os
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, NoReturn

from forkserver import config, control
from forkserver.config import ConfigError, ConfigFileNotFound, Settings

__all__ = ["ExitCode", "build_parser", "main"]


class ExitCode(enum.IntEnum):
    OK = 0
    FAILURE = 1          # a ctl command the daemon rejected
    USAGE = 64           # EX_USAGE
    NOINPUT = 66         # EX_NOINPUT: the config file does not exist
    UNAVAILABLE = 69     # EX_UNAVAILABLE: no daemon behind the control socket
    SOFTWARE = 70        # EX_SOFTWARE: a malformed reply
    CANTCREAT = 73       # EX_CANTCREAT: ctl metrics --output cannot write its file
    TEMPFAIL = 75        # EX_TEMPFAIL: the daemon did not reply in time
    NOPERM = 77          # EX_NOPERM: the control socket refused us
    CONFIG = 78          # EX_CONFIG


#: How ``forkserver ctl`` reports each way a request can fail, for scripts.
_CTL_EXIT_CODES: Final[dict[type[control.ControlError], ExitCode]] = {
    control.ControlRefused: ExitCode.NOPERM,
    control.ControlUnavailable: ExitCode.UNAVAILABLE,
    control.ControlTimeout: ExitCode.TEMPFAIL,
    control.CommandFailed: ExitCode.FAILURE,
    control.BadReply: ExitCode.SOFTWARE,
}


#: ``forkserver ctl --timeout`` defaults: a reply is immediate, except a
#: reload's, which waits for the whole new generation to be ready.
CTL_TIMEOUT: Final = 10.0
RELOAD_TIMEOUT: Final = 60.0


class UsageError(Exception):
    """A bad command line; argparse's own message."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting with status 2, and suggests
    the option an unrecognised one was probably meant to be.  Prefixes of
    options are not accepted: a script's ``--work`` would change meaning
    the day another option starting so is added."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        hint = ""
        if message.startswith("unrecognized arguments: "):
            for word in message.split(": ", 1)[1].split():
                close = difflib.get_close_matches(word.split("=")[0], _option_strings(self),
                                                  n=1, cutoff=0.7)
                if word.startswith("--") and close:
                    hint = f" (did you mean {close[0]}?)"
                    break
        raise UsageError(f"{self.prog}: error: {message}{hint}\n(see {self.prog} --help)")


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every long option of *parser* and its subcommands."""
    found: list[str] = []
    for action in parser._actions:
        found += [o for o in action.option_strings if o.startswith("--")]
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _option_strings(sub)
    return found


def _text_type(key: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return config.parse_text(key, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = key
    return convert


def _scale_type(text: str) -> dict[str, int]:
    """``N`` → ``{"workers": N}``; ``+N``/``-N`` → ``{"by": ±N}`` (resolved by the master)."""
    digits = text[1:] if text[:1] in "+-" else text
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 6:
        raise argparse.ArgumentTypeError(f"expected a worker count N, or +N / -N for more "
                                         f"or fewer workers, not {text!r}")
    if text[:1] in "+-":
        return {"by": int(text)}
    if not 1 <= int(digits) <= control.MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"workers must be between 1 and "
                                         f"{control.MAX_WORKERS}, not {text}")
    return {"workers": int(digits)}


def _worker_type(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 10:
        raise argparse.ArgumentTypeError(f"expected a worker's slot or pid, not {text!r}")
    return int(text)


def _signal_type(text: str) -> str:
    try:
        return control.parse_signal_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bind_type(text: str) -> config.ListenerSettings:
    try:
        return config.ListenerSettings(bind=config.parse_bind(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _default_text(key: str, meta: config.Setting) -> str:
    if meta.default_text:
        return meta.default_text
    value = config.default_of(key)
    if value is None:
        return "auto" if meta.kind == "choice" else "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value in ("", ()):
        return "none"
    return str(value)


def add_settings_options(parser: argparse.ArgumentParser) -> None:
    """One option per setting, grouped as in the config file.  Options
    that are not given do not appear in the namespace (SUPPRESS), so only
    what the operator typed overrides the file and environment."""
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="TOML config file (see config/forkserver.toml)")
    groups = {g: parser.add_argument_group(f"{g} settings") for g in config.GROUPS}
    for key, meta in config.setting_fields():
        env = config.env_name(key)
        if key == "handler":
            # default None, not SUPPRESS: argparse would run SUPPRESS through type=
            parser.add_argument("handler", nargs="?", type=_text_type(key),
                                default=None, metavar="HANDLER",
                                help=f"{meta.help}; env {env}")
            continue
        group = groups[meta.group]
        help_text = f"{meta.help} (default: {_default_text(key, meta)}; env {env})"
        if key == "listeners":
            group.add_argument("--bind", "-b", dest=key, action="append", type=_bind_type,
                               default=argparse.SUPPRESS, metavar=meta.metavar,
                               help=help_text + "; repeat for several listeners")
        elif meta.kind == "bool":
            group.add_argument(config.flag_name(key), dest=key,
                               action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            metavar = meta.metavar or ("|".join(meta.choices + (("auto",) if meta.optional
                                                                else ()))
                                       if meta.kind == "choice"
                                       else "N" if meta.kind == "int" else key.upper())
            group.add_argument(config.flag_name(key), dest=key, type=_text_type(key),
                               default=argparse.SUPPRESS, metavar=metavar, help=help_text)


def version() -> str:
    """The installed distribution's version (the package's own when it runs
    from a source tree that was never installed)."""
    try:
        return importlib.metadata.version("forkserver")
    except importlib.metadata.PackageNotFoundError:
        from forkserver import __version__  # noqa: PLC0415

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="forkserver",
                     description="A prefork TCP daemon: one master accepts, "
                                 "pre-forked workers run your handler.")
    parser.add_argument("--version", "-V", action="version",
                        version=f"forkserver {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = sub.add_parser("run", help="run the daemon",
                         description="Run the daemon. Settings come from defaults < "
                                     "the config file < FORKSERVER_* environment < "
                                     "these options.  Exit status: 0 stopped as asked, "
                                     "3 no worker became ready within startup_timeout, "
                                     "69 a listener cannot be opened, 78 the configuration, "
                                     "handler, user or group is unusable.")
    add_settings_options(run)
    check = sub.add_parser("check-config", help="validate and print the effective settings",
                           description="Validate the configuration exactly as `run` would, "
                                       "then print every setting and where it came from.")
    add_settings_options(check)
    _add_ctl_parser(sub)
    return parser


def _add_ctl_parser(sub: Any) -> None:
    ctl = sub.add_parser("ctl", help="control a running daemon",
                         description="Send one command to a running master over its "
                                     "control socket.  Exit codes: 0 done, 1 the daemon "
                                     "rejected the command, 69 no daemon there, "
                                     "75 no reply in time, 77 refused.")
    ctl.add_argument("--socket", "-s", metavar="PATH",
                     help="control socket (default: the daemon's control_socket from -c FILE "
                          "or FORKSERVER_CONTROL_SOCKET; else $RUNTIME_DIRECTORY/control.sock; "
                          "else /run/forkserver[-NAME]/control.sock for root, "
                          "$XDG_RUNTIME_DIR/forkserver[-NAME]/control.sock for others)")
    ctl.add_argument("-c", "--config", metavar="FILE",
                     help="find the control socket from this config file")
    ctl.add_argument("--name", metavar="NAME", default=None,
                     help="the daemon's name setting, which names its socket's directory")
    ctl.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                     help=f"how long to wait for the reply (default: {CTL_TIMEOUT:g}; for "
                          f"reload, which answers once the new generation serves or the "
                          f"reload failed, {RELOAD_TIMEOUT:g})")
    cmds = ctl.add_subparsers(dest="ctl_command", metavar="COMMAND", required=True)
    status = cmds.add_parser("status", help="the master and a table of workers")
    status.add_argument("--json", action="store_true", help="stable JSON for monitoring")
    cmds.add_parser("reload", help="reload the configuration and replace the workers; "
                                   "waits for the outcome (exit 1 and why, if it failed)")
    scale = cmds.add_parser("scale", help="set the number of workers: N, or +N/-N more/fewer",
                            description="Run N workers, or N more (+N) or fewer (-N) than "
                                        "the master runs now (never fewer than 1).")
    scale.add_argument("workers", type=_scale_type, metavar="N|+N|-N")
    kill = cmds.add_parser("kill", help="retire one worker (a successor starts), or signal it",
                           description="Retire one worker: it finishes its connections and "
                                       "a successor starts at once.  WORKER is its pid, or "
                                       "else its slot.  With --signal, send it that signal "
                                       "instead (TERM: finish and exit; QUIT: exit now; "
                                       "ABRT: dump its stacks and die; KILL).  Either way it "
                                       "is replaced, and its exit is not a crash.")
    kill.add_argument("worker", type=_worker_type, metavar="SLOT|PID")
    kill.add_argument("--signal", dest="signal_name", type=_signal_type, metavar="NAME",
                      help=f"send this signal instead ({', '.join(control.KILL_SIGNALS)})")
    stop = cmds.add_parser("stop", help="stop the daemon (graceful by default)")
    how = stop.add_mutually_exclusive_group()
    how.add_argument("--graceful", dest="mode", action="store_const", const="graceful",
                     default="graceful", help="let workers finish their connections")
    how.add_argument("--fast", dest="mode", action="store_const", const="fast",
                     help="stop now, cutting connections")
    cmds.add_parser("reopen-logs", help="reopen the log file (after rotation)")
    metrics = cmds.add_parser("metrics", help="the metrics, in Prometheus's text format",
                              description="Print every metric as GET /metrics answers it "
                                          "(docs/metrics.md), or write it to a file for "
                                          "node_exporter's textfile collector.")
    metrics.add_argument("--output", "-o", metavar="FILE",
                         help="write to FILE instead (through a temporary file in the same "
                              "directory, renamed over it: a reader never sees half), "
                              "without the process_* metrics, whose names node_exporter "
                              "uses for itself")


def _overrides(ns: argparse.Namespace) -> dict[str, Any]:
    values = {k: v for k, v in vars(ns).items() if k in config.SETTINGS and v is not None}
    if "listeners" in values:
        values["listeners"] = tuple(values["listeners"])
    return values


def _load(ns: argparse.Namespace) -> tuple[config.Loaded, Callable[[], Settings]]:
    """Load once now; return also the reload function, which re-reads the
    same file (by absolute path: the master may chdir) and environment
    with the same command-line overrides."""
    path = os.path.abspath(ns.config) if ns.config else None
    overrides = _overrides(ns)
    loaded = config.load(path, os.environ, overrides)
    if not loaded.settings.handler:     # the one setting without a usable default
        if path:
            raise ConfigError("no handler: set `handler` in the file or give HANDLER",
                              source=path, key="handler")
        raise UsageError(f"forkserver {ns.command}: error: no HANDLER given "
                         "(module:callable), and no config file (-c) that names one")

    def reload_settings() -> Settings:
        settings = config.load_settings(path, os.environ, overrides)
        if not settings.handler:
            raise ConfigError("no handler", source=path or "", key="handler")
        return settings

    return loaded, reload_settings


def _cmd_run(ns: argparse.Namespace) -> int:
    """``run``: the embedding API's ``Daemon``, its failures turned into exit codes."""
    loaded, reload_settings = _load(ns)
    # The daemon, and through it the worker machinery, is imported only to
    # run: ctl must work even where it cannot be imported.
    from forkserver.daemon import Daemon, StartupFailed  # noqa: PLC0415

    try:
        return Daemon(loaded.settings, reload_settings=reload_settings).run()
    except StartupFailed as exc:  # logged by the master already
        return exc.exit_code


def _cmd_check_config(ns: argparse.Namespace) -> int:
    """Every check ``run`` makes before its first fork (``startup.preflight``:
    the handler is imported in a child with the workers' privileges, umask
    and directory), with the same message and exit code; only the
    listeners are not opened (the running daemon may hold them)."""
    loaded, _ = _load(ns)
    from forkserver import startup  # noqa: PLC0415
    from forkserver.errors import ForkserverError  # noqa: PLC0415

    try:
        startup.preflight(loaded.settings, check_only=True)  # TLS files too
    except ForkserverError as exc:
        print(f"forkserver: cannot start: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    sys.stdout.write(format_effective(loaded))
    return ExitCode.OK


def format_effective(loaded: config.Loaded, environ: Mapping[str, str] = os.environ) -> str:
    """``key = value  # origin``, one line per setting, grouped; valid TOML
    apart from the listeners, which are shown as an inline array.  An unset
    ``control_socket`` shows the path the daemon would use here."""
    lines: list[str] = []
    for group in config.GROUPS:
        lines.append(f"# -- {group}")
        for key, meta in config.setting_fields():
            if meta.group == group:
                value = config.toml_value(key, getattr(loaded.settings, key))
                origin = loaded.origins[key]
                if key == "control_socket" and not loaded.settings.control_socket:
                    where = control.socket_path(None, loaded.settings.name, environ)
                    value = config.toml_value(key, where.path)
                    origin = f"{origin}: {where.origin}"
                lines.append(f"{key} = {value}  # {origin}")
    return "\n".join(lines) + "\n"


def _ctl_socket(ns: argparse.Namespace) -> control.SocketPath:
    """Where ``ctl`` finds the daemon: --socket, else the rule ``run``
    follows, fed with what -c FILE, the environment and --name say."""
    if ns.socket:
        return control.SocketPath(ns.socket, "--socket", configured=True)
    control_socket, name = _socket_settings(ns.config, os.environ)
    if ns.name is not None:
        name = ns.name
    return control.socket_path(control_socket, name, os.environ)


def _socket_settings(path: str | None, environ: Mapping[str, str]) -> tuple[str | None, str]:
    """``control_socket`` and ``name`` from *path* and the environment.

    A file that is invalid elsewhere still tells where the socket is (so
    ``ctl -c FILE reload`` reaches the daemon and reports what the daemon
    thinks of the file); only when these two keys cannot be read is it an
    error, saying why."""
    try:
        settings = config.load_settings(path, environ)
        return settings.control_socket, settings.name
    except ConfigFileNotFound:
        raise
    except ConfigError as exc:
        problem = exc
    values: dict[str, Any] = {}
    try:
        if path is not None:
            with open(path, "rb") as f:
                data = tomllib.loads(f.read(config.MAX_FILE_BYTES).decode("utf-8"))
            for key in ("control_socket", "name"):
                if key in data:
                    if not isinstance(data[key], str):
                        raise ValueError(f"{key}: expected a string")
                    values[key] = config.parse_text(key, data[key])
        for key in ("control_socket", "name"):
            if config.env_name(key) in environ:
                values[key] = config.parse_text(key, environ[config.env_name(key)])
    except (OSError, ValueError, RecursionError) as exc:     # TOMLDecodeError is a ValueError
        raise ConfigError(f"cannot tell where the control socket is ({exc}); give "
                          "--socket PATH", source=path or "environment") from None
    print(f"forkserver ctl: warning: {problem}; the control socket is taken from "
          "control_socket and name alone", file=sys.stderr)
    return values.get("control_socket"), values.get("name") or ""


def _cmd_ctl(ns: argparse.Namespace) -> int:
    where = _ctl_socket(ns)
    args: dict[str, object] = {}
    if ns.ctl_command == "scale":
        args.update(ns.workers)
    elif ns.ctl_command == "kill":
        args["worker"] = ns.worker
        if ns.signal_name:
            args["signal"] = ns.signal_name
    elif ns.ctl_command == "stop":
        args["mode"] = ns.mode
    timeout = ns.timeout if ns.timeout is not None else (
        RELOAD_TIMEOUT if ns.ctl_command == "reload" else CTL_TIMEOUT)
    try:
        if where.private_parent:      # in /tmp: make sure nobody else planted it
            control.check_private_dir(os.path.dirname(where.path))
        result = control.request(where.path, ns.ctl_command, args, timeout=timeout)
    except tuple(_CTL_EXIT_CODES) as exc:
        what = f"{ns.ctl_command}: " if isinstance(exc, control.CommandFailed) else ""
        print(f"forkserver ctl: {what}{exc}{_ctl_hint(exc, where, ns)}", file=sys.stderr)
        return _CTL_EXIT_CODES[type(exc)]
    if ns.ctl_command == "status":
        sys.stdout.write(control.format_status(result, as_json=ns.json))
    elif ns.ctl_command == "metrics":
        return _write_metrics(str(result), ns.output)
    elif result:
        sys.stdout.write(control.format_result(result))
    return ExitCode.OK


def _write_metrics(text: str, output: str | None) -> int:
    """``ctl metrics``: to stdout, or to *output* whole (renamed into place)."""
    if output is None:
        sys.stdout.write(text)
        return ExitCode.OK
    kept = "".join(line for line in text.splitlines(keepends=True)
                   if not line.startswith(("process_", "# HELP process_", "# TYPE process_")))
    temporary = f"{output}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(kept)
        os.replace(temporary, output)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        print(f"forkserver ctl: metrics: cannot write {output}: {exc.strerror or exc}",
              file=sys.stderr)
        return ExitCode.CANTCREAT
    return ExitCode.OK


def _ctl_hint(exc: control.ControlError, where: control.SocketPath,
              ns: argparse.Namespace) -> str:
    """What to try next, when the daemon was not where the rule looked."""
    if isinstance(exc, control.ControlTimeout) and ns.ctl_command == "reload":
        return ("\n(the reload may still complete: `forkserver ctl status` shows the "
                "generation serving and the last reload error)")
    if not isinstance(exc, control.ControlUnavailable) or where.configured:
        return ""
    return (f"\n(default path: {where.origin}; a daemon with its own control_socket or "
            "name is reached with --socket PATH, -c FILE or --name NAME)")


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _cmd_run,
    "check-config": _cmd_check_config,
    "ctl": _cmd_ctl,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``forkserver`` and ``python -m forkserver``."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser()
        ns = parser.parse_args(args)
        return COMMANDS[ns.command](ns)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return ExitCode.USAGE
    except ConfigFileNotFound as exc:
        print(f"forkserver: {exc}", file=sys.stderr)
        return ExitCode.NOINPUT
    except ConfigError as exc:
        print(f"forkserver: invalid configuration: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    except SystemExit as exc:          # --help and --version exit through argparse
        return exc.code if isinstance(exc.code, int) else ExitCode.USAGE
