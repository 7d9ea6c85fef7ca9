"""Loading handlers and choosing how to run them: no processes."""

import socketserver
import sys
from pathlib import Path

import pytest

from forkserver.handler import (
    HandlerKind,
    HandlerLoadError,
    classify,
    load_handler,
    resolve_worker_class,
    split_spec,
)


@pytest.mark.parametrize(
    ("spec", "kind"),
    [
        ("forkserver.examples.echo:handle", HandlerKind.FUNCTION),
        ("forkserver.examples.async_echo:handle", HandlerKind.COROUTINE),
        ("forkserver.examples.hello_http:async_handle", HandlerKind.COROUTINE),
        ("http.server:SimpleHTTPRequestHandler", HandlerKind.REQUEST_HANDLER),
        ("tests.handlers.basic:PidRequestHandler.handle", HandlerKind.FUNCTION),
        ("forkserver.examples.hello_http:HelloProtocol", HandlerKind.PROTOCOL),
        ("tests.handlers.protocols:BufferedEcho", HandlerKind.PROTOCOL),
    ],
)
def test_each_handler_form_is_recognised(spec: str, kind: HandlerKind) -> None:
    loaded = load_handler(spec)
    assert loaded.kind is kind
    assert loaded.spec == spec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nocolon", "expected module:attribute"),
        ("a:", "expected module:attribute"),
        (":b", "expected module:attribute"),
        ("a b:c", "expected module:attribute"),
        ("a:b-c", "expected module:attribute"),
        ("no_such_module_xyz:handle", "no module named 'no_such_module_xyz'"),
        ("tests.handlers.nope:handle", "no module named 'tests.handlers.nope'"),
        ("tests.handlers.basic:missing", "tests.handlers.basic has no 'missing'"),
        ("tests.handlers.basic:socket.nope", "has no 'socket.nope'"),
        ("tests.handlers.basic:__doc__", "is a str, not callable"),
        ("tests.handlers.basic:MessageType", "neither a socketserver.BaseRequestHandler nor"),
        ("tests.handlers.protocols:NeedsArguments",
         r"created with no arguments, but NeedsArguments\(\) needs greeting"),
    ],
)
def test_unusable_handlers_are_refused_naming_the_spec(spec: str, message: str) -> None:
    with pytest.raises(HandlerLoadError, match=message) as info:
        load_handler(spec)
    assert repr(spec) in str(info.value)


def test_an_exception_inside_the_module_is_kept_as_the_cause() -> None:
    with pytest.raises(HandlerLoadError, match="raised RuntimeError") as info:
        load_handler("tests.handlers.broken_import:handle")
    assert isinstance(info.value.__cause__, RuntimeError)


def test_an_import_error_inside_the_module_is_not_mistaken_for_a_missing_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "needs_missing_dep.py").write_text("import missing_dependency_xyz\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(HandlerLoadError, match="importing needs_missing_dep failed"):
            load_handler("needs_missing_dep:handle")
    finally:
        sys.modules.pop("needs_missing_dep", None)


def test_the_current_directory_is_searched_like_python_m(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cwd_handler_mod.py").write_text("def handle(conn, peer):\n    pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        assert load_handler("cwd_handler_mod:handle").kind is HandlerKind.FUNCTION
    finally:
        sys.modules.pop("cwd_handler_mod", None)


def test_an_instance_with_an_async_call_is_a_coroutine_handler() -> None:
    class Handler:
        async def __call__(self, reader: object, writer: object) -> None:
            return None

    assert classify("x:y", Handler()) is HandlerKind.COROUTINE
    assert classify("x:y", socketserver.StreamRequestHandler) is HandlerKind.REQUEST_HANDLER


def test_split_spec_allows_dotted_attributes() -> None:
    assert split_spec("pkg.mod:App.handle") == ("pkg.mod", "App.handle")


@pytest.mark.parametrize(
    ("kind", "requested", "expected"),
    [
        (HandlerKind.FUNCTION, None, "sync"),
        (HandlerKind.REQUEST_HANDLER, None, "sync"),
        (HandlerKind.COROUTINE, None, "asyncio"),
        (HandlerKind.FUNCTION, "thread", "thread"),
        (HandlerKind.REQUEST_HANDLER, "thread", "thread"),
        (HandlerKind.COROUTINE, "asyncio", "asyncio"),
        (HandlerKind.PROTOCOL, None, "asyncio"),
        (HandlerKind.PROTOCOL, "asyncio", "asyncio"),
    ],
)
def test_the_worker_class_follows_the_handler(
    kind: HandlerKind, requested: str | None, expected: str
) -> None:
    assert resolve_worker_class("m:h", kind, requested) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "requested", "message"),
    [
        (HandlerKind.COROUTINE, "sync", "needs --worker-class asyncio, not sync"),
        (HandlerKind.COROUTINE, "thread", "needs --worker-class asyncio, not thread"),
        (HandlerKind.FUNCTION, "asyncio", "is not a coroutine function"),
        (HandlerKind.REQUEST_HANDLER, "asyncio", "is not a coroutine function"),
        (HandlerKind.PROTOCOL, "sync", "is an asyncio protocol: it needs --worker-class asyncio"),
        (HandlerKind.PROTOCOL, "thread", "is an asyncio protocol: it needs --worker-class asyncio"),
    ],
)
def test_impossible_worker_classes_are_refused(
    kind: HandlerKind, requested: str, message: str
) -> None:
    with pytest.raises(HandlerLoadError, match=message):
        resolve_worker_class("m:h", kind, requested)  # type: ignore[arg-type]
