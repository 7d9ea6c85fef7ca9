"""Hooks: the user's code at points of the daemon's life, and what a worker hands it.

A hook is named by a setting (``post_fork = "myapp.hooks:post_fork"``),
or given as a callable to the embedding API (``forkserver.Daemon``),
which then takes the setting's place.  Where each one runs:

* master hooks (``on_starting``, ``when_ready``, ``on_reload``,
  ``pre_exec``, ``on_exit``; ``config.MASTER_HOOKS``) run in a
  short-lived child of the master that drops privileges first, under
  ``hook_timeout`` (``forkserver.hookrun``): the master never imports
  or calls a hook itself, so its loop cannot be stalled by one and no
  hook runs as root when ``user`` is set;
* worker hooks (``post_fork``, ``post_worker_init``, ``worker_exit``;
  ``config.WORKER_HOOKS``) run in each worker after its privilege drop
  (``workers.boot``), bounded by the worker's ``timeout`` (heartbeats)
  and ``graceful_timeout`` like any code of the worker.

This module loads a hook and calls it, turning whatever it raises into
a ``HookError`` that names the hook; it runs no process of its own.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from forkserver.config import MASTER_HOOKS, WORKER_HOOKS, Settings
from forkserver.errors import ForkserverError
from forkserver.handler import split_spec

__all__ = ["HOOKS", "HookError", "HookTarget", "WorkerInfo", "call", "configured", "load"]

#: Every hook, in the order of a daemon's life.
HOOKS: Final = MASTER_HOOKS + WORKER_HOOKS

#: A hook as configured: ``module:callable``, or the callable itself (embedding).
HookTarget = str | Callable[..., object]


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """Who a worker is, for its hooks (``post_fork``, ``post_worker_init``, ``worker_exit``)."""

    slot: int
    pid: int
    master_pid: int
    worker_class: str
    handler: str
    name: str


class HookError(ForkserverError):
    """A hook could not be loaded, raised, or did not finish in time; the text names it."""

    def __init__(self, message: str, *, hook: str) -> None:
        super().__init__(message)
        self.hook = hook


def configured(
    settings: Settings, objects: Mapping[str, HookTarget], names: tuple[str, ...] = HOOKS
) -> dict[str, HookTarget]:
    """The hooks among *names* that are set: a callable given in *objects* wins."""
    found: dict[str, HookTarget] = {}
    for name in names:
        target = objects.get(name) or getattr(settings, name)
        if target:
            found[name] = target
    return found


def describe(target: HookTarget) -> str:
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", "") or "?"
    return f"{module}:{getattr(target, '__qualname__', type(target).__name__)}"


def load(name: str, target: HookTarget) -> Callable[..., object]:
    """The callable *target* names (imported as the handler is); raises ``HookError``."""
    if not isinstance(target, str):
        if not callable(target):
            raise HookError(f"{name} hook {target!r} is not callable", hook=name)
        return target
    try:
        module_name, attribute = split_spec(target)
    except ForkserverError as exc:
        raise HookError(f"{name} hook: {exc}", hook=name) from None
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, "")  # as for the handler: the current directory first
    try:
        found: object = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
    except Exception as exc:
        raise HookError(f"{name} hook {target!r}: cannot load it: {type(exc).__name__}: "
                        f"{exc}", hook=name) from exc  # fmt: skip
    if not callable(found):
        raise HookError(f"{name} hook {target!r} is a {type(found).__name__}, not callable",
                        hook=name)  # fmt: skip
    return found


def call(name: str, target: HookTarget, *args: object) -> None:
    """Load and call one hook with *args*; anything it raises becomes ``HookError``.

    ``SystemExit`` and ``KeyboardInterrupt`` count as failures too: a hook
    never decides how the process it runs in ends.
    """
    function = load(name, target)
    try:
        function(*args)
    except BaseException as exc:
        raise HookError(f"{name} hook {describe(target)} raised {type(exc).__name__}: {exc}",
                        hook=name) from exc  # fmt: skip
