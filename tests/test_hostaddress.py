"""HostAddress: QHostAddress's special addresses, parsing, value semantics."""

from __future__ import annotations

import copy
import ipaddress
import pickle
import socket

import pytest

from forkserver.hostaddress import HostAddress, NetworkLayerProtocol


def test_special_addresses() -> None:
    assert str(HostAddress.LocalHost) == "127.0.0.1"
    assert str(HostAddress.LocalHostIPv6) == "::1"
    assert str(HostAddress.AnyIPv4) == "0.0.0.0"
    assert str(HostAddress.AnyIPv6) == "::"
    assert str(HostAddress.Any) == "::"
    assert str(HostAddress.Broadcast) == "255.255.255.255"
    assert str(HostAddress.Null) == ""
    assert HostAddress.Null.is_null()
    assert HostAddress() == HostAddress.Null


def test_any_is_dual_stack_and_distinct_from_any_ipv6() -> None:
    assert HostAddress.Any.is_any()
    assert HostAddress.Any.protocol() is NetworkLayerProtocol.AnyIPProtocol
    assert HostAddress.Any != HostAddress.AnyIPv6
    assert not HostAddress.AnyIPv6.is_any()
    assert HostAddress.Any.family() == socket.AF_INET6
    assert repr(HostAddress.Any) == "HostAddress.Any"


@pytest.mark.parametrize(
    ("text", "protocol"),
    [
        ("10.1.2.3", NetworkLayerProtocol.IPv4Protocol),
        ("2001:db8::1", NetworkLayerProtocol.IPv6Protocol),
        (" ::1 ", NetworkLayerProtocol.IPv6Protocol),
    ],
)
def test_parses_numeric_addresses(text: str, protocol: NetworkLayerProtocol) -> None:
    address = HostAddress(text)
    assert not address.is_null()
    assert address.protocol() is protocol
    assert str(address) == text.strip()


@pytest.mark.parametrize(
    "text", ["not an address", "localhost", "", "1.2.3", "256.0.0.1", "::g", "1.2.3.4:80"]
)
def test_anything_but_a_numeric_address_is_null(text: str) -> None:
    address = HostAddress(text)
    assert address.is_null()
    assert address.protocol() is NetworkLayerProtocol.UnknownNetworkLayerProtocol
    assert address == HostAddress.Null


def test_rejects_other_types() -> None:
    with pytest.raises(TypeError, match="not int"):
        HostAddress(127)  # type: ignore[arg-type]


def test_value_semantics() -> None:
    assert HostAddress("::1") == HostAddress.LocalHostIPv6
    assert HostAddress(HostAddress.Any) == HostAddress.Any
    assert HostAddress(ipaddress.ip_address("127.0.0.1")) == HostAddress.LocalHost
    assert len({HostAddress("127.0.0.1"), HostAddress.LocalHost, HostAddress.Any}) == 2
    assert HostAddress.LocalHost != "127.0.0.1"
    with pytest.raises(AttributeError, match="immutable"):
        HostAddress.LocalHost._ip = None


def test_loopback() -> None:
    assert HostAddress.LocalHost.is_loopback()
    assert HostAddress.LocalHostIPv6.is_loopback()
    assert not HostAddress.Any.is_loopback()
    assert not HostAddress.Null.is_loopback()


def test_endpoint_text_and_bind_tuples() -> None:
    assert HostAddress.LocalHost.with_port(8000) == "127.0.0.1:8000"
    assert HostAddress.LocalHostIPv6.with_port(8000) == "[::1]:8000"
    assert HostAddress.LocalHost.sockaddr(80) == ("127.0.0.1", 80)
    assert HostAddress.LocalHostIPv6.sockaddr(80) == ("::1", 80, 0, 0)
    scoped = HostAddress("fe80::1%lo")
    assert scoped.scope_id() == "lo"
    assert scoped.sockaddr(80) == ("fe80::1", 80, 0, socket.if_nametoindex("lo"))


def test_null_address_has_no_family_or_sockaddr() -> None:
    with pytest.raises(ValueError, match="null HostAddress"):
        HostAddress.Null.family()
    with pytest.raises(ValueError, match="cannot be bound"):
        HostAddress.Null.sockaddr(80)


def test_from_sockaddr_reads_getsockname() -> None:
    with socket.socket(socket.AF_INET6) as sock:
        sock.bind(("::1", 0))
        assert HostAddress.from_sockaddr(sock.family, sock.getsockname()) == HostAddress("::1")
    assert HostAddress.from_sockaddr(socket.AF_INET, ("127.0.0.1", 5)) == HostAddress.LocalHost
    assert HostAddress.from_sockaddr(socket.AF_UNIX, "/run/x.sock").is_null()


@pytest.mark.parametrize(
    "address",
    [HostAddress.Any, HostAddress.AnyIPv6, HostAddress.Null, HostAddress("fe80::1%lo")],
)
def test_copies_and_pickles_by_value(address: HostAddress) -> None:
    assert copy.deepcopy(address) == address
    assert pickle.loads(pickle.dumps(address)) == address


# -- IPv6 zones ----------------------------------------------------------------


def test_a_zone_compares_by_the_interface_it_names() -> None:
    lo = socket.if_nametoindex("lo")
    by_name, by_index = HostAddress("fe80::1%lo"), HostAddress(f"fe80::1%{lo}")
    assert by_name == by_index
    assert hash(by_name) == hash(by_index)
    assert len({by_name, by_index}) == 1
    # Each keeps the text it was given, as QHostAddress::scopeId() does.
    assert (str(by_name), by_name.scope_id()) == ("fe80::1%lo", "lo")
    assert (str(by_index), by_index.scope_id()) == (f"fe80::1%{lo}", str(lo))


def test_a_different_or_missing_zone_is_a_different_address() -> None:
    scoped = HostAddress("fe80::1%lo")
    assert scoped != HostAddress("fe80::1")
    assert scoped != HostAddress("fe80::2%lo")
    assert scoped != HostAddress("fe80::1%nosuchif0")
    # A name no interface has is only equal to the same name.
    assert HostAddress("fe80::1%nosuchif0") == HostAddress("fe80::1%nosuchif0")
    assert HostAddress("fe80::1%nosuchif0") != HostAddress("fe80::1%nosuchif1")


def test_from_sockaddr_names_the_scope_by_interface_as_qt_does() -> None:
    lo = socket.if_nametoindex("lo")
    address = HostAddress.from_sockaddr(socket.AF_INET6, ("fe80::1", 80, 0, lo))
    assert str(address) == "fe80::1%lo"
    assert address.scope_id() == "lo"
    assert address == HostAddress("fe80::1%lo")
    taken = {index for index, _ in socket.if_nameindex()}
    unused = max(taken) + 1000
    orphan = HostAddress.from_sockaddr(socket.AF_INET6, ("fe80::1", 80, 0, unused))
    assert str(orphan) == f"fe80::1%{unused}"  # no interface has that index: the number
