"""The supervisor channel protocol: round trips and strict decoding."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forkserver import channel
from forkserver.channel import (
    MAX_MESSAGE_SIZE,
    MAX_TRACEBACK,
    Connections,
    Done,
    Durations,
    HandlerError,
    Handshakes,
    Heartbeat,
    Leaving,
    MessageType,
    ProtocolError,
    Ready,
    Refusals,
    Reopen,
    Served,
    Stats,
    Stop,
    decode_master_message,
    decode_worker_message,
    encode,
)

WORKER_MESSAGES = [
    Ready(pid=1234),
    Done(count=1),
    Done(count=0xFFFFFFFF),
    Served(count=1),
    Served(count=0xFFFFFFFF),
    Heartbeat(),
    Stats(served=10**12, in_flight=3, errors=7),
    Leaving(reason="is out of descriptors (RLIMIT_NOFILE 1024)"),
    Refusals(counts=((0, "not_allowed", 3), (0xFFFF, "bad_signature", 2**64 - 1))),
    Refusals(counts=tuple((i, "x" * 32, i) for i in range(channel.MAX_REFUSAL_ENTRIES))),
    Durations(entries=((0, 1234, (1,) + (0,) * 16), (0xFFFF, 2**64 - 1, (2**64 - 1,) * 17))),
    Durations(entries=tuple((i, i, tuple(range(17))) for i in range(channel.MAX_DURATION_ENTRIES))),
    Handshakes(counts=((0, "done", 2**64 - 1), (3, "protocol_version", 1))),
    HandlerError(
        listener=2,
        exc_type="ValueError",
        message="bad thing é",
        traceback="Traceback (most recent call last):\n  ...\nValueError: bad thing",
        peer="127.0.0.1:4242",
    ),
]
MASTER_MESSAGES = [Connections(listeners=(0,)), Connections(listeners=(1, 0, 7) * 84), Stop(),
                   Reopen()]


@pytest.mark.parametrize("message", WORKER_MESSAGES, ids=repr)
def test_worker_messages_round_trip(message: channel.WorkerMessage) -> None:
    assert decode_worker_message(encode(message)) == message


@pytest.mark.parametrize("message", MASTER_MESSAGES, ids=lambda m: type(m).__name__)
def test_master_messages_round_trip(message: channel.MasterMessage) -> None:
    assert decode_master_message(encode(message)) == message


def test_long_error_strings_are_cut_to_their_bound_keeping_the_traceback_end() -> None:
    tb = "line\n" * 20000 + "KeyError: the cause"
    message = HandlerError(
        listener=0, exc_type="E" * 1000, message="m" * 10**5, traceback=tb, peer=""
    )
    data = encode(message)
    assert len(data) <= MAX_MESSAGE_SIZE
    decoded = decode_worker_message(data)
    assert isinstance(decoded, HandlerError)
    assert decoded.traceback.endswith("KeyError: the cause")
    assert len(decoded.traceback.encode()) <= MAX_TRACEBACK
    assert decoded.message.startswith("mmm")
    assert decoded.exc_type.endswith("…")


def test_unencodable_text_is_escaped_not_refused() -> None:
    message = HandlerError(listener=0, exc_type="E", message="\udcff", traceback="", peer="")
    decoded = decode_worker_message(encode(message))
    assert isinstance(decoded, HandlerError)
    assert decoded.message == "\\udcff"


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (Connections(listeners=()), "1 to 253"),
        (Connections(listeners=(0,) * 254), "1 to 253"),
        (Done(count=0), "positive"),
        (Served(count=0), "positive"),
        (Ready(pid=-1), "out of range"),
        (Stats(served=-1, in_flight=0, errors=0), "served"),
        (Refusals(counts=()), "1 to 1024 entries"),
        (Refusals(counts=((0, "x", 1),) * 1025), "1 to 1024 entries"),
        (Refusals(counts=((0, "Bad Reason", 1),)), "not 1-32 characters"),
        (Refusals(counts=((0, "x" * 33, 1),)), "not 1-32 characters"),
        (Refusals(counts=((0, "", 1),)), "not 1-32 characters"),
        (Refusals(counts=((0x10000, "x", 1),)), "listener"),
        (Refusals(counts=((0, "x", -1),)), "total"),
        (Durations(entries=()), "1 to 256 entries"),
        (Durations(entries=((0, 0, (0,) * 17),) * 257), "1 to 256 entries"),
        (Durations(entries=((0, 0, (0,) * 16),)), "17 bucket counts, not 16"),
        (Durations(entries=((0x10000, 0, (0,) * 17),)), "listener"),
        (Durations(entries=((0, -1, (0,) * 17),)), "sum"),
        (Durations(entries=((0, 0, (0,) * 16 + (-1,)),)), "bucket count"),
    ],
)
def test_encode_refuses_out_of_range_fields(message: object, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        encode(message)  # type: ignore[arg-type]


def _header(kind: int, version: int = channel.VERSION) -> bytes:
    return bytes([version, kind])


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", "shorter than the header"),
        (b"\x01", "shorter than the header"),
        (b"\x00" * (MAX_MESSAGE_SIZE + 1), "exceeds"),
        (_header(0x11, version=2) + struct.pack("<I", 1), "protocol version 2"),
        (_header(0x7F), "unknown message type 0x7f"),
        (_header(MessageType.STOP), "not sent by a worker"),
        (_header(MessageType.CONNECTIONS) + b"\x01\x00\x00\x00", "not sent by a worker"),
        (_header(MessageType.READY), "READY body is 0 bytes"),
        (_header(MessageType.DONE) + struct.pack("<I", 0), "count of 0"),
        (_header(MessageType.DONE) + struct.pack("<Q", 1), "DONE body is 8 bytes"),
        (_header(MessageType.SERVED) + struct.pack("<I", 0), "SERVED with a count of 0"),
        (_header(MessageType.SERVED), "SERVED body is 0 bytes"),
        (_header(MessageType.HEARTBEAT) + b"x", "HEARTBEAT has a 1-byte body"),
        (_header(MessageType.STATS) + b"\x00" * 5, "STATS body is 5 bytes"),
        (_header(MessageType.ERROR), "too short"),
        (_header(MessageType.ERROR) + b"\x00\x00", "before the length of exc_type"),
        (
            _header(MessageType.ERROR) + b"\x00\x00" + struct.pack("<I", 10**6),
            "exc_type is 1000000",
        ),
        (_header(MessageType.ERROR) + b"\x00\x00" + struct.pack("<I", 5) + b"ab", "runs past"),
        (
            _header(MessageType.ERROR) + b"\x00\x00" + struct.pack("<I", 1) + b"\xff",
            "exc_type is not UTF-8",
        ),
        (encode(WORKER_MESSAGES[-1]) + b"!", "1 bytes after its last field"),
        (encode(Leaving(reason="x")) + b"!", "LEAVING has 1 bytes after its reason"),
        (_header(MessageType.LEAVING) + struct.pack("<I", 5000), "reason is 5000 bytes"),
        (_header(MessageType.REFUSALS), "too short for its count"),
        (_header(MessageType.REFUSALS) + struct.pack("<H", 0), "count 0 is outside"),
        (_header(MessageType.REFUSALS) + struct.pack("<H", 1025), "count 1025 is outside"),
        (_header(MessageType.REFUSALS) + struct.pack("<HHB", 1, 0, 2) + b"ab",
         "ends inside entry 0"),
        (_header(MessageType.REFUSALS) + struct.pack("<HHB", 1, 0, 5) + b"ab",
         "entry 0 has no valid reason"),
        (_header(MessageType.REFUSALS) + struct.pack("<HHB", 1, 0, 2) + b"A!" + b"\0" * 8,
         "entry 0 has no valid reason"),
        (encode(Refusals(counts=((0, "x", 1),))) + b"!", "1 bytes after its last entry"),
        (_header(MessageType.DURATIONS), "DURATIONS body is too short"),
        (_header(MessageType.DURATIONS) + struct.pack("<H", 0), "count 0 is outside"),
        (_header(MessageType.DURATIONS) + struct.pack("<H", 257), "count 257 is outside"),
        (_header(MessageType.DURATIONS) + struct.pack("<HHQ", 1, 0, 0) + b"\0" * 135,
         "body is 147 bytes, expected 148 for 1 entries"),
        (encode(Durations(entries=((0, 0, (0,) * 17),))) + b"!",
         "body is 149 bytes, expected 148"),
        (_header(MessageType.DURATIONS) + struct.pack("<H", 2)
         + (struct.pack("<HQ", 3, 0) + b"\0" * 136) * 2, "names listener 3 twice"),
    ],
)
def test_worker_message_decoder_names_what_is_wrong(data: bytes, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        decode_worker_message(data)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (_header(MessageType.READY) + struct.pack("<I", 1), "READY is not sent by the master"),
        (_header(MessageType.CONNECTIONS), "too short for its count"),
        (_header(MessageType.CONNECTIONS) + struct.pack("<H", 0), "count 0 is outside"),
        (_header(MessageType.CONNECTIONS) + struct.pack("<H", 300), "count 300 is outside"),
        (_header(MessageType.CONNECTIONS) + struct.pack("<HH", 2, 0), "expected 6 for 2"),
        (_header(MessageType.STOP) + b"\x00", "STOP has a 1-byte body"),
        (_header(MessageType.REOPEN) + b"\x00\x00", "REOPEN has a 2-byte body"),
    ],
)
def test_master_message_decoder_names_what_is_wrong(data: bytes, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        decode_master_message(data)


@given(st.binary(max_size=512))
def test_decoding_arbitrary_bytes_only_ever_raises_protocol_error(data: bytes) -> None:
    for decode in (decode_worker_message, decode_master_message):
        try:
            message = decode(data)
        except ProtocolError:
            continue
        assert encode(message) == data


@given(
    st.builds(
        HandlerError,
        listener=st.integers(0, 0xFFFF),
        exc_type=st.text(max_size=300),
        message=st.text(max_size=5000),
        traceback=st.text(max_size=100),
        peer=st.text(max_size=300),
    )
)
def test_any_encodable_error_decodes(message: HandlerError) -> None:
    decoded = decode_worker_message(encode(message))
    assert isinstance(decoded, HandlerError)
    assert decoded.listener == message.listener


@pytest.mark.parametrize("count", [1, 2, 63, 64, 65, 1000, 0xFFFFFFFF])
def test_done_encodes_the_same_with_or_without_a_message_object(count: int) -> None:
    data = channel.encode_done(count)
    assert data == channel.encode(channel.Done(count=count))
    assert data == bytes([channel.VERSION, channel.MessageType.DONE]) + count.to_bytes(4, "little")
    assert channel.decode_worker_message(data) == channel.Done(count=count)


@pytest.mark.parametrize("listener", [0, 1, 15, 16, 300])
def test_one_connection_encodes_and_decodes_the_same_on_every_path(listener: int) -> None:
    data = channel.encode_connections([listener])
    assert data == bytes([channel.VERSION, channel.MessageType.CONNECTIONS]) + struct.pack(
        "<HH", 1, listener
    )
    assert channel.decode_master_message(data) == channel.Connections(listeners=(listener,))


def test_a_done_of_zero_is_refused_on_both_sides() -> None:
    with pytest.raises(ValueError, match="positive count"):
        channel.encode_done(0)
    with pytest.raises(channel.ProtocolError, match="DONE with a count of 0"):
        channel.decode_worker_message(bytes([channel.VERSION, MessageType.DONE, 0, 0, 0, 0]))
