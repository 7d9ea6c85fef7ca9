"""``proxy_allow_from``: who may send a PROXY header."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forkserver.proxyallow import AllowList, AllowListError, compile_allow_list


def test_addresses_and_networks_of_both_families() -> None:
    allow = compile_allow_list(["10.0.0.0/8", "192.168.1.5", "2001:db8::/32", "::1"])
    assert allow.allows(("10.255.0.1", 4000))
    assert allow.allows(("192.168.1.5", 1))
    assert not allow.allows(("192.168.1.6", 1))
    assert not allow.allows(("11.0.0.1", 1))
    assert allow.allows(("2001:db8:ffff::1", 1, 0, 0))
    assert allow.allows(("::1", 1, 0, 0))
    assert not allow.allows(("::2", 1, 0, 0))
    assert not allow.allows(("2001:db9::1", 1, 0, 0))
    assert not allow.unix and not allow.trusts_any
    assert allow.entries == ("10.0.0.0/8", "192.168.1.5", "2001:db8::/32", "::1")


def test_ipv4_mapped_peers_match_ipv4_entries_and_ipv6_ones() -> None:
    allow = compile_allow_list(["10.0.0.0/8"])
    assert allow.allows(("::ffff:10.1.2.3", 1, 0, 0))  # an IPv4 client of a dual-stack socket
    assert not allow.allows(("::ffff:11.1.2.3", 1, 0, 0))
    assert not allow.allows(("::10.1.2.3", 1, 0, 0))  # IPv4-compatible is not mapped
    assert compile_allow_list(["::ffff:0:0/96"]).allows(("::ffff:1.2.3.4", 1, 0, 0))
    assert compile_allow_list(["::/0"]).allows(("::ffff:1.2.3.4", 1, 0, 0))
    assert not compile_allow_list(["::/0"]).allows(("1.2.3.4", 1))


def test_unix_peers_are_trusted_only_when_listed() -> None:
    assert compile_allow_list(["unix"]).allows("")  # an unnamed client socket
    assert compile_allow_list([" UNIX "]).allows(b"\x00abstract")
    assert not compile_allow_list(["0.0.0.0/0", "::/0"]).allows("")
    assert not compile_allow_list(["unix"]).allows(("127.0.0.1", 1))


def test_every_ip_only_when_written_so() -> None:
    every = compile_allow_list(["0.0.0.0/0"])
    assert every.trusts_any
    assert every.allows(("203.0.113.9", 1)) and not every.allows(("::1", 1, 0, 0))
    assert compile_allow_list(["unix", "::/0"]).trusts_any


def test_real_peers_from_loopback_sockets() -> None:
    allow = compile_allow_list(["127.0.0.0/8", "::1"])
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with socket.create_connection(listener.getsockname()) as client:
            server, peer = listener.accept()
            with server:
                assert allow.allows(peer) and allow.allows(server.getpeername())
                assert client.getsockname() == peer
    left, right = socket.socketpair()
    with left, right:
        assert not allow.allows(left.getpeername())
        assert compile_allow_list(["unix"]).allows(left.getpeername())


def test_link_local_peer_with_zone_is_matched_by_its_address() -> None:
    allow = compile_allow_list(["fe80::/10"])
    assert allow.allows(("fe80::1%lo", 1, 0, 1))
    assert not allow.allows(("not an address", 1))


@pytest.mark.parametrize(("entries", "words"), [
    ([], "proxy_allow_from is empty"),
    (["10.0.0.0/8", ""], "entry 2 ('') is empty"),
    (["  "], "entry 1 ('  ') is empty"),
    (["localhost"], "entry 1 ('localhost') is not an IPv4 or IPv6 address or network"),
    (["10.0.0.0/33"], "'10.0.0.0/33'"),
    (["10.0.0.1/8"], "has host bits set: write 10.0.0.0/8 for the network, or 10.0.0.1 alone"),
    (["010.0.0.1"], "'010.0.0.1'"),
    (["fe80::1%eth0"], "a zone"),
    (["0.0.0.0"], "is no peer's address; write 0.0.0.0/0 to trust every IPv4 peer"),
    (["::"], "write ::/0 to trust every IPv6 peer"),
    (["10.0.0.0/8, 10.1.0.0/16"], "entry 1"),  # one entry per item, not a list in a string
    ([7], "entry 1 is not a string: 7"),
])  # fmt: skip
def test_bad_lists_and_entries_are_named(entries: list[str], words: str) -> None:
    with pytest.raises(AllowListError) as info:
        compile_allow_list(entries)
    assert words in str(info.value)
    assert isinstance(info.value, ValueError)


def test_the_setting_name_in_messages_is_the_callers() -> None:
    with pytest.raises(AllowListError, match=r"^listeners\[0\].proxy_allow_from entry 1"):
        compile_allow_list(["x"], setting="listeners[0].proxy_allow_from")


networks = st.one_of(
    st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)).map(
        lambda p: ipaddress.ip_network((p[0], p[1]), strict=False)),
    st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 128)).map(
        lambda p: ipaddress.ip_network((ipaddress.IPv6Address(p[0]), p[1]), strict=False)),
)  # fmt: skip
hosts = st.one_of(st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
                  st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address))  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(st.lists(networks, min_size=1, max_size=8), st.lists(hosts, max_size=8), st.data())
def test_membership_agrees_with_ipaddress(
        nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
        peers: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
        data: st.DataObject) -> None:  # fmt: skip
    allow: AllowList = compile_allow_list([str(n) for n in nets])
    # Also peers inside the listed networks, where a wrong shift would show.
    peers += [net[data.draw(st.integers(0, net.num_addresses - 1))] for net in nets]
    for peer in peers:
        mapped = peer.ipv4_mapped if isinstance(peer, ipaddress.IPv6Address) else None
        expected = any(peer in n for n in nets) or (
            mapped is not None and any(mapped in n for n in nets))
        text = socket.inet_ntop(socket.AF_INET6 if peer.version == 6 else socket.AF_INET,
                                peer.packed)  # fmt: skip
        address = (text, 1) if peer.version == 4 else (text, 1, 0, 0)
        assert allow.allows(address) == expected, (peer, nets)
