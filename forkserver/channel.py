"""The supervisor channel protocol: encode and decode, no I/O.

Each worker has one ``AF_UNIX``/``SOCK_SEQPACKET`` socketpair with the
master.  SEQPACKET keeps message boundaries, so one ``sendmsg`` is one
message and a descriptor can never ride on the wrong message.

Every message starts with two bytes, ``VERSION`` and the message type,
followed by a body whose layout depends on the type.  Integers are
little-endian and unsigned.  Strings are ``u32 length`` + UTF-8 bytes.
No message is longer than ``MAX_MESSAGE_SIZE`` bytes.

Master to worker:

====  ===========  ========================================================
type  name         body
====  ===========  ========================================================
0x01  CONNECTIONS  ``u16 n``, then ``n`` x ``u16 listener index``; exactly
                   ``n`` descriptors (1 ≤ n ≤ ``MAX_FDS_PER_MESSAGE``)
                   ride along with SCM_RIGHTS, in the same order
0x02  STOP         empty: finish what you hold, then exit
0x03  REOPEN       empty; exactly one descriptor rides along: the log file
                   as the master has just reopened it (USR1, ``ctl
                   reopen-logs``), to log to from now on instead of the
                   old one; a worker may no longer be allowed to open it
====  ===========  ========================================================

Worker to master:

====  =========  ==========================================================
type  name       body
====  =========  ==========================================================
0x10  READY      ``u32 pid``: the handler is loaded, send connections
0x11  DONE       ``u32 n``: n connections finished (capacity freed)
0x12  ERROR      ``u16 listener``, then strings ``exc_type``, ``message``,
                 ``traceback``, ``peer``: a handler raised
0x13  HEARTBEAT  empty: the worker's loop is alive
0x14  STATS      ``u64 served``, ``u32 in_flight``, ``u64 errors``
0x15  SERVED     ``u32 n``: n connections this worker accepted itself from
                 a ``dispatch = "shared"`` listener finished; counted as
                 served, never as capacity freed (the master did not
                 hand them out)
0x16  LEAVING    string ``reason``: the worker reads its channel no more
                 (it is out of descriptors, say); it finishes what it
                 holds, then exits.  What is queued for it is the
                 master's to take back and give to another worker
0x17  REFUSALS   ``u16 n``, then n x (``u16 listener``, ``u8 length`` +
                 that many bytes of ``[a-z0-9_]`` ``reason``, ``u64
                 total``): connections the worker closed before the
                 handler ran (a PROXY header refused, say), each the
                 running total since it started for that listener and
                 reason; sent with the stats when one moved
0x18  DURATIONS  ``u16 n``, then n x (``u16 listener``, ``u64 sum_us``,
                 17 x ``u64 count``): how long the connections of that
                 listener whose handler ran took, since the worker
                 started: the total in microseconds and one count per
                 bucket of ``DURATION_BOUNDS`` and one past the last
                 (not cumulative); running totals, sent with the stats
                 when one moved and before the worker exits
0x19  HANDSHAKES as REFUSALS: TLS handshakes on each listener, ``done``
                 or failed by reason (``timeout``, ``not_tls``, ...),
                 running totals; sent with the stats when one moved
====  =========  ==========================================================

A worker never sends descriptors.  The decoder is strict: a short or
long body, an unknown version or type, a message from the wrong
direction, a string over its bound or not UTF-8 all raise
``ProtocolError`` naming what was wrong.  The encoder never produces a
message the decoder refuses: over-long error strings are cut to their
bound (keeping the end of a traceback, where the cause is).
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

VERSION: Final = 1
#: No message on the channel is larger than this.
MAX_MESSAGE_SIZE: Final = 65536
#: The kernel's SCM_MAX_FD: the most descriptors one sendmsg can carry.
MAX_FDS_PER_MESSAGE: Final = 253
#: Bounds on the strings of an ERROR message, in bytes of UTF-8.
MAX_EXC_TYPE: Final = 256
MAX_ERROR_MESSAGE: Final = 4096
MAX_TRACEBACK: Final = 32768
MAX_PEER: Final = 256
MAX_REASON: Final = 1024
MAX_LISTENER_INDEX: Final = 0xFFFF
#: Bounds on a REFUSALS message: entries, and bytes of each reason.
MAX_REFUSAL_ENTRIES: Final = 1024
MAX_REFUSAL_REASON: Final = 32
#: Upper bounds, in seconds, of the connection-duration buckets (DURATIONS):
#: part of the wire format, so both ends of the channel count alike.
DURATION_BOUNDS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                          2.5, 5.0, 10.0, 30.0, 60.0, 300.0)  # fmt: skip
#: At most this many listeners in one DURATIONS message (a worker sends more).
MAX_DURATION_ENTRIES: Final = 256


class MessageType(enum.IntEnum):
    CONNECTIONS = 0x01
    STOP = 0x02
    REOPEN = 0x03
    READY = 0x10
    DONE = 0x11
    ERROR = 0x12
    HEARTBEAT = 0x13
    STATS = 0x14
    SERVED = 0x15
    LEAVING = 0x16
    REFUSALS = 0x17
    DURATIONS = 0x18
    HANDSHAKES = 0x19


class ProtocolError(Exception):
    """A channel message is malformed, oversized, unknown or out of place."""


@dataclass(frozen=True, slots=True)
class Connections:
    """Descriptors follow, one per listener index, in order."""

    listeners: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Stop:
    """Finish the connections you hold, then exit."""


@dataclass(frozen=True, slots=True)
class Reopen:
    """Log to the file whose descriptor comes with this message."""


@dataclass(frozen=True, slots=True)
class Ready:
    pid: int


@dataclass(frozen=True, slots=True)
class Done:
    count: int


@dataclass(frozen=True, slots=True)
class Served:
    """Connections from a shared listener, accepted by the worker itself, finished."""

    count: int


@dataclass(frozen=True, slots=True)
class Leaving:
    """The worker receives nothing more; it exits once its connections are done."""

    reason: str


@dataclass(frozen=True, slots=True)
class HandlerError:
    listener: int
    exc_type: str
    message: str
    traceback: str
    peer: str


@dataclass(frozen=True, slots=True)
class Heartbeat:
    pass


@dataclass(frozen=True, slots=True)
class Stats:
    served: int
    in_flight: int
    errors: int


@dataclass(frozen=True, slots=True)
class Refusals:
    """Running totals of connections closed before the handler: (listener, reason, total)."""

    counts: tuple[tuple[int, str, int], ...]


@dataclass(frozen=True, slots=True)
class Durations:
    """Running totals by listener: (listener, sum in microseconds, bucket counts)."""

    entries: tuple[tuple[int, int, tuple[int, ...]], ...]


@dataclass(frozen=True, slots=True)
class Handshakes:
    """Running totals of TLS handshakes: (listener, ``done`` or a failure reason, total)."""

    counts: tuple[tuple[int, str, int], ...]


MasterMessage = Connections | Stop | Reopen
WorkerMessage = (Ready | Done | Served | HandlerError | Heartbeat | Stats | Leaving
                 | Refusals | Durations | Handshakes)  # fmt: skip

_HEADER: Final = struct.Struct("<BB")
_U16: Final = struct.Struct("<H")
_U32: Final = struct.Struct("<I")
_STATS: Final = struct.Struct("<QIQ")
_U32_MAX: Final = 0xFFFFFFFF
_U64_MAX: Final = 0xFFFFFFFFFFFFFFFF

_TYPES: Final = {int(kind): kind for kind in MessageType}  # cheaper than MessageType(n)
_STOP_BYTES: Final = _HEADER.pack(VERSION, MessageType.STOP)
_REOPEN_BYTES: Final = _HEADER.pack(VERSION, MessageType.REOPEN)
_HEARTBEAT_BYTES: Final = _HEADER.pack(VERSION, MessageType.HEARTBEAT)
_CONNECTIONS_PREFIX: Final = _HEADER.pack(VERSION, MessageType.CONNECTIONS)


# --- encoding ----------------------------------------------------------


def encode_connections(listeners: Sequence[int]) -> bytes:
    """The CONNECTIONS header for ``len(listeners)`` descriptors."""
    count = len(listeners)
    if count == 1 and listeners[0] < _CACHED_LISTENERS:
        return _ONE_CONNECTION[listeners[0]]
    if not 1 <= count <= MAX_FDS_PER_MESSAGE:
        raise ValueError(f"CONNECTIONS carries 1 to {MAX_FDS_PER_MESSAGE} descriptors, not {count}")
    return _CONNECTIONS_PREFIX + struct.pack(f"<H{count}H", count, *listeners)


def encode(message: MasterMessage | WorkerMessage) -> bytes:  # noqa: PLR0911, PLR0912 (one per type)
    """Encode any message; raises ValueError for out-of-range fields."""
    if isinstance(message, Done):
        return encode_done(message.count)
    match message:
        case Connections(listeners=listeners):
            return encode_connections(listeners)
        case Stop():
            return _STOP_BYTES
        case Reopen():
            return _REOPEN_BYTES
        case Heartbeat():
            return _HEARTBEAT_BYTES
        case Ready(pid=pid):
            return _header(MessageType.READY) + _U32.pack(_bounded(pid, _U32_MAX, "pid"))
        case Stats(served=served, in_flight=in_flight, errors=errors):
            return _header(MessageType.STATS) + _STATS.pack(
                _bounded(served, _U64_MAX, "served"),
                _bounded(in_flight, _U32_MAX, "in_flight"),
                _bounded(errors, _U64_MAX, "errors"),
            )
        case Served(count=count):
            if count < 1:
                raise ValueError(f"SERVED needs a positive count, not {count}")
            return _header(MessageType.SERVED) + _U32.pack(_bounded(count, _U32_MAX, "count"))
        case HandlerError():
            return _encode_error(message)
        case Leaving(reason=reason):
            return _header(MessageType.LEAVING) + _encode_string(reason, MAX_REASON,
                                                                 keep_end=False)  # fmt: skip
        case Refusals(counts=counts):
            return _encode_refusals(counts)
        case Durations(entries=entries):
            return _encode_durations(entries)
        case Handshakes(counts=counts):
            return _encode_refusals(counts, MessageType.HANDSHAKES)
    raise TypeError(f"not a channel message: {message!r}")


def encode_done(count: int) -> bytes:
    """DONE for *count* connections, without building a ``Done`` first."""
    if 0 < count < _CACHED_COUNTS:
        return _DONE_BYTES[count]
    if count < 1:
        raise ValueError(f"DONE needs a positive count, not {count}")
    return _header(MessageType.DONE) + _U32.pack(_bounded(count, _U32_MAX, "count"))


def _header(kind: MessageType) -> bytes:
    return _HEADER.pack(VERSION, kind)


def _bounded(value: int, limit: int, name: str) -> int:
    if not 0 <= value <= limit:
        raise ValueError(f"{name} {value} is out of range 0-{limit}")
    return value


def _encode_error(message: HandlerError) -> bytes:
    parts = [
        _header(MessageType.ERROR),
        _U16.pack(_bounded(message.listener, MAX_LISTENER_INDEX, "listener")),
        _encode_string(message.exc_type, MAX_EXC_TYPE, keep_end=False),
        _encode_string(message.message, MAX_ERROR_MESSAGE, keep_end=False),
        _encode_string(message.traceback, MAX_TRACEBACK, keep_end=True),
        _encode_string(message.peer, MAX_PEER, keep_end=False),
    ]
    return b"".join(parts)


_REFUSAL_REASON: Final = re.compile(rb"[a-z0-9_]{1,%d}" % MAX_REFUSAL_REASON)
_U16_U8: Final = struct.Struct("<HB")
_U64: Final = struct.Struct("<Q")


def _encode_refusals(counts: Sequence[tuple[int, str, int]],
                     kind: MessageType = MessageType.REFUSALS) -> bytes:  # fmt: skip
    if not 1 <= len(counts) <= MAX_REFUSAL_ENTRIES:
        raise ValueError(f"{kind.name} carries 1 to {MAX_REFUSAL_ENTRIES} entries, "
                         f"not {len(counts)}")  # fmt: skip
    parts = [_header(kind), _U16.pack(len(counts))]
    for listener, reason, total in counts:
        raw = reason.encode("ascii", "replace")
        if not _REFUSAL_REASON.fullmatch(raw):
            raise ValueError(f"REFUSALS reason {reason!r} is not 1-{MAX_REFUSAL_REASON} "
                             "characters of a-z, 0-9 and _")  # fmt: skip
        parts += [_U16_U8.pack(_bounded(listener, MAX_LISTENER_INDEX, "listener"), len(raw)),
                  raw, _U64.pack(_bounded(total, _U64_MAX, "total"))]  # fmt: skip
    return b"".join(parts)


_BUCKETS: Final = len(DURATION_BOUNDS) + 1
_DURATION_ENTRY: Final = struct.Struct(f"<HQ{_BUCKETS}Q")


def _encode_durations(entries: Sequence[tuple[int, int, tuple[int, ...]]]) -> bytes:
    if not 1 <= len(entries) <= MAX_DURATION_ENTRIES:
        raise ValueError(f"DURATIONS carries 1 to {MAX_DURATION_ENTRIES} entries, "
                         f"not {len(entries)}")  # fmt: skip
    parts = [_header(MessageType.DURATIONS), _U16.pack(len(entries))]
    for listener, sum_us, buckets in entries:
        if len(buckets) != _BUCKETS:
            raise ValueError(f"DURATIONS needs {_BUCKETS} bucket counts, not {len(buckets)}")
        parts.append(_DURATION_ENTRY.pack(
            _bounded(listener, MAX_LISTENER_INDEX, "listener"), _bounded(sum_us, _U64_MAX, "sum"),
            *(_bounded(count, _U64_MAX, "bucket count") for count in buckets)))  # fmt: skip
    return b"".join(parts)


def _encode_string(text: str, limit: int, *, keep_end: bool) -> bytes:
    data = text.encode("utf-8", "backslashreplace")
    if len(data) > limit:
        marker = "…".encode()
        room = limit - len(marker)
        if keep_end:
            cut = data[-room:].decode("utf-8", "ignore").encode()
            data = marker + cut
        else:
            cut = data[:room].decode("utf-8", "ignore").encode()
            data = cut + marker
    return _U32.pack(len(data)) + data


# --- decoding ----------------------------------------------------------


def decode_master_message(data: bytes) -> MasterMessage:
    """Decode what a worker receives from the master."""
    known = _KNOWN_FROM_MASTER.get(data)
    if known is not None:
        return known
    kind, body = _split(data)
    if kind == MessageType.CONNECTIONS:
        return _decode_connections(body)
    if kind == MessageType.STOP:
        _expect_empty(kind, body)
        return Stop()
    if kind == MessageType.REOPEN:
        _expect_empty(kind, body)
        return Reopen()
    raise ProtocolError(f"message type {kind.name} is not sent by the master")


def decode_worker_message(data: bytes) -> WorkerMessage:  # noqa: PLR0911, PLR0912 (one per type)
    """Decode what the master receives from a worker."""
    known = _KNOWN_FROM_WORKER.get(data)
    if known is not None:
        return known
    kind, body = _split(data)
    match kind:
        case MessageType.READY:
            return Ready(pid=_decode_u32(kind, body))
        case MessageType.DONE:
            count = _decode_u32(kind, body)
            if count == 0:
                raise ProtocolError("DONE with a count of 0")
            return Done(count=count)
        case MessageType.SERVED:
            count = _decode_u32(kind, body)
            if count == 0:
                raise ProtocolError("SERVED with a count of 0")
            return Served(count=count)
        case MessageType.HEARTBEAT:
            _expect_empty(kind, body)
            return Heartbeat()
        case MessageType.STATS:
            if len(body) != _STATS.size:
                raise ProtocolError(f"STATS body is {len(body)} bytes, expected {_STATS.size}")
            served, in_flight, errors = _STATS.unpack(body)
            return Stats(served=served, in_flight=in_flight, errors=errors)
        case MessageType.ERROR:
            return _decode_error(body)
        case MessageType.LEAVING:
            reason, end = _decode_string(body, 0, "reason", MAX_REASON, "LEAVING")
            if end != len(body):
                raise ProtocolError(f"LEAVING has {len(body) - end} bytes after its reason")
            return Leaving(reason=reason)
        case MessageType.REFUSALS:
            return _decode_refusals(body)
        case MessageType.DURATIONS:
            return _decode_durations(body)
        case MessageType.HANDSHAKES:
            return Handshakes(counts=_decode_refusals(body, "HANDSHAKES").counts)
    raise ProtocolError(f"message type {kind.name} is not sent by a worker")


def descriptors_expected(message: MasterMessage) -> int:
    """How many descriptors must come with *message*."""
    if isinstance(message, Connections):
        return len(message.listeners)
    return 1 if isinstance(message, Reopen) else 0


def _split(data: bytes) -> tuple[MessageType, bytes]:
    if len(data) > MAX_MESSAGE_SIZE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_SIZE}")
    if len(data) < _HEADER.size:
        raise ProtocolError(f"message of {len(data)} bytes is shorter than the header")
    version, kind = _HEADER.unpack_from(data)
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}, expected {VERSION}")
    message_type = _TYPES.get(kind)
    if message_type is None:
        raise ProtocolError(f"unknown message type 0x{kind:02x}")
    return message_type, data[_HEADER.size :]


def _expect_empty(kind: MessageType, body: bytes) -> None:
    if body:
        raise ProtocolError(f"{kind.name} has a {len(body)}-byte body, expected none")


def _decode_u32(kind: MessageType, body: bytes) -> int:
    if len(body) != _U32.size:
        raise ProtocolError(f"{kind.name} body is {len(body)} bytes, expected {_U32.size}")
    value: int = _U32.unpack(body)[0]
    return value


def _decode_connections(body: bytes) -> Connections:
    if len(body) < _U16.size:
        raise ProtocolError("CONNECTIONS body is too short for its count")
    (count,) = _U16.unpack_from(body)
    if not 1 <= count <= MAX_FDS_PER_MESSAGE:
        raise ProtocolError(f"CONNECTIONS count {count} is outside 1-{MAX_FDS_PER_MESSAGE}")
    expected = _U16.size * (count + 1)
    if len(body) != expected:
        raise ProtocolError(
            f"CONNECTIONS body is {len(body)} bytes, expected {expected} for {count} descriptors"
        )
    return Connections(listeners=struct.unpack_from(f"<{count}H", body, _U16.size))


def _decode_error(body: bytes) -> HandlerError:
    if len(body) < _U16.size:
        raise ProtocolError("ERROR body is too short for its listener index")
    (listener,) = _U16.unpack_from(body)
    offset = _U16.size
    fields: list[str] = []
    for name, limit in (
        ("exc_type", MAX_EXC_TYPE),
        ("message", MAX_ERROR_MESSAGE),
        ("traceback", MAX_TRACEBACK),
        ("peer", MAX_PEER),
    ):
        text, offset = _decode_string(body, offset, name, limit)
        fields.append(text)
    if offset != len(body):
        raise ProtocolError(f"ERROR has {len(body) - offset} bytes after its last field")
    exc_type, message, traceback, peer = fields
    return HandlerError(
        listener=listener, exc_type=exc_type, message=message, traceback=traceback, peer=peer
    )


def _decode_refusals(body: bytes, name: str = "REFUSALS") -> Refusals:
    if len(body) < _U16.size:
        raise ProtocolError(f"{name} body is too short for its count")
    (count,) = _U16.unpack_from(body)
    if not 1 <= count <= MAX_REFUSAL_ENTRIES:
        raise ProtocolError(f"{name} count {count} is outside 1-{MAX_REFUSAL_ENTRIES}")
    offset, entries = _U16.size, []
    for number in range(count):
        if offset + _U16_U8.size > len(body):
            raise ProtocolError(f"{name} ends inside entry {number}")
        listener, size = _U16_U8.unpack_from(body, offset)
        offset += _U16_U8.size
        raw = body[offset : offset + size]
        if len(raw) != size or not _REFUSAL_REASON.fullmatch(raw):
            raise ProtocolError(f"{name} entry {number} has no valid reason "
                                f"(1-{MAX_REFUSAL_REASON} of a-z, 0-9, _)")  # fmt: skip
        offset += size
        if offset + _U64.size > len(body):
            raise ProtocolError(f"{name} ends inside entry {number}")
        (total,) = _U64.unpack_from(body, offset)
        offset += _U64.size
        entries.append((listener, raw.decode("ascii"), total))
    if offset != len(body):
        raise ProtocolError(f"{name} has {len(body) - offset} bytes after its last entry")
    return Refusals(counts=tuple(entries))


def _decode_durations(body: bytes) -> Durations:
    if len(body) < _U16.size:
        raise ProtocolError("DURATIONS body is too short for its count")
    (count,) = _U16.unpack_from(body)
    if not 1 <= count <= MAX_DURATION_ENTRIES:
        raise ProtocolError(f"DURATIONS count {count} is outside 1-{MAX_DURATION_ENTRIES}")
    expected = _U16.size + count * _DURATION_ENTRY.size
    if len(body) != expected:
        raise ProtocolError(f"DURATIONS body is {len(body)} bytes, expected {expected} "
                            f"for {count} entries")  # fmt: skip
    entries = []
    seen: set[int] = set()
    for at in range(_U16.size, expected, _DURATION_ENTRY.size):
        listener, sum_us, *buckets = _DURATION_ENTRY.unpack_from(body, at)
        if listener in seen:
            raise ProtocolError(f"DURATIONS names listener {listener} twice")
        seen.add(listener)
        entries.append((listener, sum_us, tuple(buckets)))
    return Durations(entries=tuple(entries))


def _decode_string(
    body: bytes, offset: int, name: str, limit: int, kind: str = "ERROR"
) -> tuple[str, int]:
    if offset + _U32.size > len(body):
        raise ProtocolError(f"{kind} ends before the length of {name}")
    (size,) = _U32.unpack_from(body, offset)
    offset += _U32.size
    if size > limit:
        raise ProtocolError(f"{kind} field {name} is {size} bytes, more than {limit}")
    if offset + size > len(body):
        raise ProtocolError(f"{kind} field {name} runs past the end of the message")
    try:
        text = body[offset : offset + size].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{kind} field {name} is not UTF-8: {exc.reason}") from None
    return text, offset + size


# --- the per-connection messages, encoded and decoded once -------------
#
# One connection costs the master a CONNECTIONS of one descriptor and a
# DONE back, each a few microseconds of struct work and frozen-dataclass
# construction.  Their common forms are computed here, with the general
# code above, and looked up by their exact bytes: anything else, including
# every malformed message, takes the strict path.

_CACHED_LISTENERS: Final = 16
_CACHED_COUNTS: Final = 64
_ONE_CONNECTION: Final = tuple(
    _CONNECTIONS_PREFIX + struct.pack("<HH", 1, index) for index in range(_CACHED_LISTENERS)
)
_DONE_BYTES: Final = tuple(  # by count; 0 is never sent
    _header(MessageType.DONE) + _U32.pack(count) for count in range(_CACHED_COUNTS)
)
#: CONNECTIONS of one descriptor from the first listeners, by listener index.
ONE_CONNECTION_BYTES: Final = _ONE_CONNECTION
#: CONNECTIONS of one descriptor by its exact bytes, for the worker's receive.
ONE_CONNECTION: Final[dict[bytes, Connections]] = {
    data: _decode_connections(data[_HEADER.size :]) for data in _ONE_CONNECTION
}
_KNOWN_FROM_MASTER: Final[dict[bytes, MasterMessage]] = dict(ONE_CONNECTION)
_KNOWN_FROM_WORKER: Final[dict[bytes, WorkerMessage]] = {
    data: Done(count=count) for count, data in enumerate(_DONE_BYTES) if count
}
#: DONE's count by its exact bytes, for the master's receive: the one
#: message per few connections, read without building a ``Done``.
DONE_COUNTS: Final[dict[bytes, int]] = {
    data: count for count, data in enumerate(_DONE_BYTES) if count
}
