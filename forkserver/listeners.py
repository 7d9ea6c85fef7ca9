"""Bind specs and the listening sockets they name.

A bind spec is one ``--bind`` value (or a ``listeners`` entry in the
config file).  The accepted forms:

=================  ==============================================
``HOST:PORT``      TCP on a host name or IPv4 address
``[V6]:PORT``      TCP on an IPv6 address
``:PORT``          TCP on every address, IPv4 and IPv6 (dual stack)
``unix:PATH``      a Unix stream socket at PATH (``@NAME``: abstract)
``fd://N``         an already listening socket inherited as fd N
``systemd``        every socket systemd passed (LISTEN_FDS)
``systemd:NAME``   the systemd socket(s) named NAME (LISTEN_FDNAMES)
=================  ==============================================

``parse_bind`` is pure: it checks the text and names what is wrong.
``open_listeners`` turns parsed specs into listening sockets.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final, Literal

#: Longer bind specs are refused before any parsing.
MAX_SPEC_LENGTH: Final = 4096
#: ``sun_path`` holds 108 bytes including the terminating NUL.
MAX_UNIX_PATH_BYTES: Final = 107

BindKind = Literal["tcp", "unix", "fd", "systemd"]

_PORT_RE: Final = re.compile(r"[0-9]{1,5}")
_HOST_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,253}")
_NAME_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,255}")


class ListenerError(ValueError):
    """A bind spec is malformed, or its socket cannot be opened."""


@dataclass(frozen=True, slots=True)
class BindSpec:
    """One parsed bind spec; fields that do not apply to ``kind`` are empty."""

    kind: BindKind
    host: str = ""
    port: int = 0
    path: str = ""
    fd: int = -1
    name: str = ""
    text: str = ""


def parse_bind(text: str) -> BindSpec:
    """Parse one bind spec, raising ``ListenerError`` naming it when invalid."""
    if not isinstance(text, str):
        raise ListenerError(f"bind spec must be a string, not {type(text).__name__}")
    if len(text) > MAX_SPEC_LENGTH:
        raise ListenerError(f"bind spec is too long ({len(text)} > {MAX_SPEC_LENGTH} characters)")
    if text != text.strip() or not text:
        raise ListenerError(f"bind spec {text!r}: empty or surrounded by whitespace")
    if text.startswith("unix:"):
        return _parse_unix(text)
    if text.startswith("fd://"):
        return _parse_fd(text)
    if text == "systemd" or text.startswith("systemd:"):
        return _parse_systemd(text)
    return _parse_tcp(text)


def _parse_unix(text: str) -> BindSpec:
    path = text[len("unix:") :]
    if not path:
        raise ListenerError(f"bind spec {text!r}: no path after 'unix:'")
    if "\0" in path:
        raise ListenerError(f"bind spec {text!r}: the path contains a NUL byte")
    size = len(path.encode("utf-8", "surrogateescape"))
    if size > MAX_UNIX_PATH_BYTES:
        raise ListenerError(
            f"bind spec {text!r}: the path is {size} bytes, more than a Unix socket "
            f"address holds ({MAX_UNIX_PATH_BYTES})"
        )
    return BindSpec(kind="unix", path=path, text=text)


def _parse_fd(text: str) -> BindSpec:
    number = text[len("fd://") :]
    if not number.isascii() or not number.isdigit() or len(number) > 9:
        raise ListenerError(f"bind spec {text!r}: 'fd://' needs a descriptor number")
    fd = int(number)
    if fd < 3:
        raise ListenerError(f"bind spec {text!r}: fd {fd} is a standard stream, not a socket")
    return BindSpec(kind="fd", fd=fd, text=text)


def _parse_systemd(text: str) -> BindSpec:
    if text == "systemd":
        return BindSpec(kind="systemd", text=text)
    name = text[len("systemd:") :]
    if not _NAME_RE.fullmatch(name):
        raise ListenerError(
            f"bind spec {text!r}: a systemd socket name is 1 to 255 of A-Z a-z 0-9 . _ : -"
        )
    return BindSpec(kind="systemd", name=name, text=text)


def _parse_tcp(text: str) -> BindSpec:
    host_part, sep, port_text = text.rpartition(":")
    if not sep:
        raise ListenerError(
            f"bind spec {text!r}: expected HOST:PORT, [V6]:PORT, :PORT, unix:PATH, "
            "fd://N or systemd[:NAME]"
        )
    port = _parse_port(text, port_text)
    if host_part.startswith("["):
        if not host_part.endswith("]"):
            raise ListenerError(f"bind spec {text!r}: unbalanced '[' in the IPv6 address")
        host = host_part[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ListenerError(f"bind spec {text!r}: {host!r} is not an IPv6 address") from None
        return BindSpec(kind="tcp", host=host, port=port, text=text)
    if ":" in host_part:
        raise ListenerError(
            f"bind spec {text!r}: an IPv6 address must be in brackets, as in [::1]:{port}"
        )
    if host_part and not _HOST_RE.fullmatch(host_part):
        raise ListenerError(f"bind spec {text!r}: {host_part!r} is not a host name or address")
    return BindSpec(kind="tcp", host=host_part, port=port, text=text)


def _parse_port(text: str, port_text: str) -> int:
    if not _PORT_RE.fullmatch(port_text):
        raise ListenerError(f"bind spec {text!r}: port {port_text!r} is not a number 0-65535")
    port = int(port_text)
    if port > 65535:
        raise ListenerError(f"bind spec {text!r}: port {port} is out of range 0-65535")
    return port
