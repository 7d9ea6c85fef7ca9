"""``workers.preamble`` on its own: which listeners get a step, counts, the context."""

from __future__ import annotations

import socket
import threading

from forkserver import config
from forkserver.workers import preamble
from tests import proxyproto_build as build


def _settings(**env: str) -> config.Settings:
    return config.load_settings(None, {f"FORKSERVER_{k.upper()}": v for k, v in env.items()})


def test_only_proxy_listeners_get_a_preamble(tmp_path: object) -> None:
    path = f"{tmp_path}/f.toml"
    with open(path, "w") as f:
        f.write('proxy_allow_from = ["198.18.0.0/15"]\nproxy_header_timeout = 2\n'
                '[[listeners]]\nbind = ":1"\n'
                '[[listeners]]\nbind = ":2"\nname = "edge"\nproxy_protocol = "v1"\n')
    settings = config.load_settings(path, {})
    off, edge = preamble.for_listeners(settings, [0, 1], ["a", "edge"])
    assert off is None
    assert edge is not None
    assert (edge.listener, edge.version, edge.header_timeout) == ("edge", 1, 2.0)
    assert edge.allow.allows(("198.19.1.1", 5)) and not edge.allow.allows(("127.0.0.1", 5))
    assert preamble.for_listeners(settings, [0], ["a"]) == ()  # nothing per connection
    # A listener opened without a table (the default bind) follows the global settings.
    glob = _settings(proxy_protocol="v2", proxy_allow_from="::1")
    (only,) = preamble.for_listeners(glob, [None], ["127.0.0.1:8000"])
    assert only is not None and only.version == 2


def test_refusals_count_and_report_what_moved() -> None:
    refusals = preamble.Refusals(slot=3)
    assert refusals.take_changed() == ()
    for _ in range(5):
        refusals.refused(0, "edge", "timeout", ("127.0.0.1", 9), "late")
    refusals.refused(1, "local", "not_allowed", "", "no")
    assert refusals.take_changed() == ((0, "timeout", 5), (1, "not_allowed", 1))
    assert refusals.take_changed() == ()
    refusals.refused(0, "edge", "timeout", ("127.0.0.1", 9), "late")
    assert refusals.take_changed() == ((0, "timeout", 6),)


def test_the_context_is_per_thread_and_forgotten() -> None:
    step = preamble.for_listeners(_settings(proxy_protocol="v1", proxy_allow_from="127.0.0.1"),
                                  [None], ["x"])[0]  # fmt: skip
    assert step is not None
    server = socket.create_server(("127.0.0.1", 0))
    seen: dict[str, object] = {}

    def other_thread() -> None:
        seen["other"] = preamble.proxy_info()

    with server, socket.create_connection(server.getsockname()) as client:
        conn, peer = server.accept()
        with conn:
            client.sendall(build.v1("TCP4", "192.0.2.1", "192.0.2.2", 1, 2) + b"rest")
            admitted = preamble.admit_blocking(step, preamble.Refusals(), conn, 0, peer)
            assert admitted is not None and admitted[1] == ("192.0.2.1", 1)
            info = preamble.proxy_info()
            assert info is not None and info.proxy == peer and info.server == ("192.0.2.2", 2)
            thread = threading.Thread(target=other_thread)
            thread.start()
            thread.join()
            assert seen["other"] is None
            assert conn.recv(10) == b"rest"
            preamble.forget()
            assert preamble.proxy_info() is None


def test_a_refused_peer_is_not_read_from() -> None:
    step = preamble.for_listeners(_settings(proxy_protocol="v2", proxy_allow_from="127.0.0.2"),
                                  [None], ["x"])[0]  # fmt: skip
    assert step is not None
    refusals = preamble.Refusals()
    server = socket.create_server(("127.0.0.1", 0))
    with server, socket.create_connection(server.getsockname()) as client:
        conn, peer = server.accept()
        with conn:
            client.sendall(b"anything")
            assert preamble.admit_blocking(step, refusals, conn, 0, peer) is None
            assert conn.recv(100, socket.MSG_PEEK) == b"anything"
    assert refusals.counts == {(0, "not_allowed"): 1}
