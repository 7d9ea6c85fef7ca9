"""Running the daemon from Python: ``serve()`` and ``Daemon``.

``forkserver run`` is a thin layer over ``Daemon``: the same settings
model, the same checks, the same master.  Where the command line exits
with a code, this raises: ``ConfigError`` (naming the key) for settings
that are invalid, ``StartupFailed`` (with the ``exit_code`` the command
would have used, and the ``error`` that caused it) when the daemon
cannot start.  Once started, ``run()`` returns the master's exit code
(0 after a stop, 3 when no worker became ready within ``startup_timeout``).

The handler, and any hook, may be given as an object instead of
``module:callable``.  Such an object was imported by the caller, in the
caller's process, before forkserver could drop any privilege; forkserver
only *calls* it in processes that have dropped (workers, hook children).
So an object handler is treated as ``preload``: it is refused with
``user``/``group`` under a root master (as preload is: the caller's
import already ran as root), ``reload`` cannot watch it, and a reload
(HUP) re-reads the settings only, never the handler.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from forkserver import config
from forkserver.config import ConfigError, ListenerSettings, Settings
from forkserver.handler import LoadedHandler, classify
from forkserver.hooks import HOOKS, HookTarget
from forkserver.startup import StartupFailed

__all__ = ["Daemon", "StartupFailed", "serve", "settings"]

#: What an object handler is called in process titles and logs when its
#: module and name do not make a ``module:attribute``.
OBJECT_HANDLER = "__main__:handler"


def settings(
    values: Mapping[str, object] | None = None,
    /,
    *,
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
    **more: object,
) -> Settings:
    """Checked ``Settings`` from Python values (``bind=`` too), over *config_file*
    and *environ* (by default no environment: ``os.environ`` to read it as the
    command line does).  Raises ``ConfigError`` naming the key."""
    return config.load_values({**(values or {}), **more}, config_file=config_file,
                              environ=environ, source="settings()").settings  # fmt: skip


class Daemon:
    """One daemon, run in this process by ``run()`` until it stops.

    *settings* are checked ``Settings`` (``forkserver.settings(...)``, or
    ``config.load``).  *handler*, when given, is the handler object, in
    place of ``settings.handler``.  *hooks* maps hook names (``post_fork``,
    ``when_ready``, ...) to callables, in place of their settings.
    *reload_settings* gives the settings a reload (HUP, ``ctl reload``)
    applies; without it a reload applies the same settings again (and,
    with a ``module:callable`` handler, loads the handler anew).  With
    *configure_logging* (the default) the daemon sets up logging as its
    settings say (``log_level``, ``log_format``, ``log_file``); without it
    the caller's logging configuration is left as it is.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        handler: object | None = None,
        hooks: Mapping[str, Callable[..., object]] | None = None,
        reload_settings: Callable[[], Settings] | None = None,
        configure_logging: bool = True,
    ) -> None:
        self.hooks: dict[str, HookTarget] = dict(_check_hooks(hooks or {}))
        self.loaded: LoadedHandler | None = None
        if handler is not None:
            if isinstance(handler, str):
                settings = dataclasses.replace(settings, handler=handler)
            else:
                settings, self.loaded = _object_handler(settings, handler)
        if not settings.handler:
            raise ConfigError("no handler: give one (module:callable, or the object)",
                              key="handler")  # fmt: skip
        _check_in_process(settings, self.loaded, self.hooks)
        self.settings = settings
        self.configure_logging = configure_logging
        self._reload_settings = reload_settings

    def reload_settings(self) -> Settings:
        """The settings a reload applies (run in the reload check's child)."""
        fresh = self._reload_settings() if self._reload_settings is not None else self.settings
        if self.loaded is not None:  # the object stays the handler
            fresh = dataclasses.replace(fresh, handler=self.loaded.spec)
        elif not fresh.handler:
            raise ConfigError("no handler", key="handler")
        _check_in_process(fresh, self.loaded, self.hooks)
        return fresh

    def run(self) -> int:
        """Run until a stop; the master's exit code.  Raises ``StartupFailed``.

        Call it from the main thread: the master handles signals (TERM,
        INT, QUIT, HUP, USR1, USR2, TTIN, TTOU, CHLD) while it runs.  It
        takes on ``umask`` and ``chdir`` first, as ``forkserver run`` does.
        """
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("Daemon.run() must be called from the main thread: "
                               "the master handles signals")  # fmt: skip
        # Imported here: ``import forkserver`` must stay light for handlers and ctl.
        from forkserver import log, master, probe  # noqa: PLC0415

        probe.enter(self.settings)  # before any file or socket is created
        if self.configure_logging:
            log.configure(self.settings)
        return master.serve(self.settings, reload_settings=self.reload_settings,
                            handler=self.loaded, hook_objects=self.hooks,
                            raise_failures=True)  # fmt: skip


def serve(
    handler: str | object,
    *,
    bind: str | Sequence[str | ListenerSettings | Mapping[str, object]] = (),
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
    configure_logging: bool = True,
    **values: Any,
) -> int:
    """Run the daemon with *handler* until it stops; the exit code.

    ``serve("myapp:handle", bind=["127.0.0.1:8000"], workers=4)``: every
    other keyword is a setting (see docs/configuration.md), checked as the
    command line checks it; a hook setting may be a callable
    (``post_fork=open_pool``).  *config_file* and *environ* are read
    under them, and re-read on each reload.  Raises ``ConfigError``
    naming the key, or ``StartupFailed``.
    """
    hooks = {name: values.pop(name) for name in HOOKS
             if callable(values.get(name))}  # fmt: skip
    if bind:
        values["bind"] = bind
    if isinstance(handler, str):
        values["handler"] = handler

    def load() -> Settings:
        return config.load_values(values, config_file=config_file, environ=environ,
                                  source="serve()").settings  # fmt: skip

    first = load()
    return Daemon(first, handler=None if isinstance(handler, str) else handler, hooks=hooks,
                  reload_settings=load, configure_logging=configure_logging).run()  # fmt: skip


def _check_hooks(hooks: Mapping[str, object]) -> Mapping[str, HookTarget]:
    for name, target in hooks.items():
        if name not in HOOKS:
            raise ConfigError("not a hook" + config._suggest(name, HOOKS), key=name)
        if not callable(target):
            raise ConfigError(f"expected a callable, got {type(target).__name__}", key=name)
    return hooks  # type: ignore[return-value]


def _object_handler(settings: Settings, target: object) -> tuple[Settings, LoadedHandler]:
    module = getattr(target, "__module__", "") or ""
    name = getattr(target, "__qualname__", "") or ""
    spec = f"{module}:{name}"
    if not config._HANDLER_RE.fullmatch(spec):
        spec = OBJECT_HANDLER
    try:
        kind = classify(spec, target)
    except ConfigError:
        raise
    except Exception as exc:  # HandlerLoadError: not something a worker can call
        raise ConfigError(str(exc), key="handler") from None
    return dataclasses.replace(settings, handler=spec), LoadedHandler(spec, kind, target)


def _check_in_process(settings: Settings, loaded: LoadedHandler | None,
                      hooks: Mapping[str, HookTarget]) -> None:
    """Objects imported by the caller: refused where preload is, and with reload."""
    given = (["handler"] if loaded is not None else []) + sorted(hooks)
    if not given:
        return
    if settings.reload and loaded is not None:
        raise ConfigError("reload = true with a handler given as an object: it was imported "
                          "by the caller and cannot be imported again; give it as "
                          "module:callable", key="reload")  # fmt: skip
    if (settings.user or settings.group) and os.geteuid() == 0:
        raise ConfigError(
            f"{', '.join(given)} given as Python objects with user/group set, under a root "
            "master: they were imported by this process as root, before any privilege "
            "drop; give them as module:callable (each worker and hook child then imports "
            "them after dropping), or run this process as the user", key=given[0])
