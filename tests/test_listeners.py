"""Bind specs: parsing (pure) and opening listening sockets."""

import pytest

from forkserver.listeners import BindSpec, ListenerError, parse_bind


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8000", BindSpec(kind="tcp", host="127.0.0.1", port=8000)),
        ("localhost:0", BindSpec(kind="tcp", host="localhost", port=0)),
        ("[::1]:80", BindSpec(kind="tcp", host="::1", port=80)),
        ("[::]:65535", BindSpec(kind="tcp", host="::", port=65535)),
        (":8080", BindSpec(kind="tcp", host="", port=8080)),
        ("unix:/run/x.sock", BindSpec(kind="unix", path="/run/x.sock")),
        ("unix:@abstract", BindSpec(kind="unix", path="@abstract")),
        ("fd://3", BindSpec(kind="fd", fd=3)),
        ("systemd", BindSpec(kind="systemd")),
        ("systemd:web", BindSpec(kind="systemd", name="web")),
    ],
)
def test_parse_bind_accepts_every_documented_form(text: str, expected: BindSpec) -> None:
    spec = parse_bind(text)
    assert spec.kind == expected.kind
    assert (spec.host, spec.port, spec.path, spec.fd, spec.name) == (
        expected.host,
        expected.port,
        expected.path,
        expected.fd,
        expected.name,
    )
    assert spec.text == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        (" 127.0.0.1:80", "whitespace"),
        ("127.0.0.1", "expected HOST:PORT"),
        ("127.0.0.1:", "is not a number"),
        ("127.0.0.1:http", "is not a number"),
        ("127.0.0.1:65536", "out of range"),
        ("127.0.0.1:٣", "is not a number"),
        ("::1:80", "must be in brackets"),
        ("[::1:80", "unbalanced"),
        ("[1.2.3.4]:80", "not an IPv6 address"),
        ("ho st:80", "not a host name"),
        ("unix:", "no path"),
        ("unix:" + "a" * 200, "more than a Unix socket address holds"),
        ("unix:/a\0b", "NUL"),
        ("fd://", "needs a descriptor number"),
        ("fd://x", "needs a descriptor number"),
        ("fd://-3", "needs a descriptor number"),
        ("fd://1", "standard stream"),
        ("systemd:", "systemd socket name"),
        ("systemd:a b", "systemd socket name"),
        ("x" * 5000, "too long"),
    ],
)
def test_parse_bind_rejects_bad_specs_naming_them(text: str, message: str) -> None:
    with pytest.raises(ListenerError, match=message) as info:
        parse_bind(text)
    if len(text) < 100:
        assert repr(text) in str(info.value)


def test_parse_bind_rejects_non_strings() -> None:
    with pytest.raises(ListenerError, match="must be a string"):
        parse_bind(8000)  # type: ignore[arg-type]
