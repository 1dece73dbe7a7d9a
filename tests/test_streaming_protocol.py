"""Wire format: every message kind round-trips; malformed bytes raise ProtocolError, nothing else."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from speechlm.streaming import protocol
from speechlm.streaming.protocol import (
    Audio,
    Control,
    Error,
    ErrorCode,
    Handshake,
    Kind,
    Metadata,
    ProtocolError,
    SessionConfig,
    Text,
    Unknown,
    decode,
    encode,
)

SETTINGS = settings(max_examples=150, deadline=None)

json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12
)
json_objects = st.dictionaries(st.text(max_size=10), json_values, max_size=6)
times = st.floats(min_value=0, max_value=1e6, allow_nan=False)

messages = st.one_of(
    st.builds(Handshake, config=json_objects, version=st.just(protocol.VERSION)),
    st.builds(Audio, payload=st.binary(min_size=1, max_size=2000)),
    st.builds(
        lambda text, a, b, speaker: Text(text, min(a, b), max(a, b), speaker),
        st.text(max_size=50),
        times,
        times,
        st.sampled_from(protocol.SPEAKERS),
    ),
    st.builds(
        Control, action=st.sampled_from(protocol.ACTIONS), fields=json_objects.map(lambda d: {k: v for k, v in d.items() if k != "action"})
    ),
    st.builds(Metadata, data=json_objects),
    st.builds(Error, code=st.text(max_size=20), message=st.text(max_size=80)),
)


@SETTINGS
@given(messages)
def test_every_message_round_trips(message):
    assert decode(encode(message)) == message


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_decode_or_raise_protocol_error(data):
    try:
        message = decode(data)
    except ProtocolError as e:
        assert str(e) and e.code
    else:
        if data[0] > Kind.ERROR:
            assert message == Unknown(data[0], data[1:])


@SETTINGS
@given(messages, st.data())
def test_truncated_messages_never_crash(message, data):
    raw = encode(message)
    cut = data.draw(st.integers(0, len(raw) - 1))
    try:
        decode(raw[:cut])
    except ProtocolError:
        pass


def test_byte_layouts():
    assert encode(Handshake({"codec": "pcm16"})) == b"\x00\x01" + b'{"codec":"pcm16"}'
    assert encode(Audio.from_pcm(np.array([0.0, 1.0, -1.0], np.float32))) == b"\x01\x00\x00\xff\x7f\x01\x80"
    assert json.loads(encode(Control("ping", {"id": 3}))[1:]) == {"id": 3, "action": "ping"}
    assert encode(Error("bad_message", "x"))[0] == Kind.ERROR
    pcm = np.array([0.5, -0.25], np.float32)
    np.testing.assert_allclose(Audio.from_pcm(pcm).pcm16(), pcm, atol=1 / 32768)


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b"", "empty message"),
        ("hello", "text websocket frames"),
        (b"\x00", "missing its version byte"),
        (b"\x00\x01not json", "not valid JSON"),
        (b"\x00\x01[1, 2]", "must be a JSON object"),
        (b"\x00\x01\xff\xfe", "not UTF-8"),
        (b"\x01", "no audio"),
        (b"\x02" + b'{"text": "hi", "start": 0, "end": 1}', "missing 'speaker'"),
        (b"\x02" + b'{"text": "hi", "start": 2, "end": 1, "speaker": "model"}', "0 <= start <= end"),
        (b"\x02" + b'{"text": "hi", "start": NaN, "end": 1, "speaker": "model"}', "not valid JSON"),
        (b"\x02" + b'{"text": "hi", "start": 0, "end": 1e999, "speaker": "model"}', "0 <= start <= end"),
        (b"\x02" + b'{"text": 5, "start": 0, "end": 1, "speaker": "model"}', "wrong type"),
        (b"\x02" + b'{"text": "hi", "start": 0, "end": 1, "speaker": "robot"}', "speaker must be"),
        (b"\x02" + b'{"text": "\\ud800", "start": 0, "end": 1, "speaker": "user"}', "lone surrogate"),
        (b"\x03" + b'{"id": 1}', "needs a string 'action'"),
        (b"\x03" + b'{"action": "dance"}', "unknown control action"),
        (b"\x03" + b'{"action": "ping", "x": ' + b"[" * 50 + b"]" * 50 + b"}", "nests deeper"),
        (b"\x03" + b"[" * 100_000, "over the"),
        (b"\x05" + b'{"code": 1, "message": "x"}', "string 'code' and 'message'"),
    ],
    ids=lambda value: value[:24].decode("latin-1") if isinstance(value, bytes) else str(value)[:24],
)
def test_malformed_messages_say_what_is_wrong(raw, fragment):
    with pytest.raises(ProtocolError) as info:
        decode(raw)
    assert fragment in str(info.value)


def test_deep_json_within_the_size_limit_is_rejected_not_a_crash():
    with pytest.raises(ProtocolError, match="not valid JSON|nests deeper"):
        decode(b"\x04" + b"[" * 30_000 + b"]" * 30_000)


def test_unknown_kinds_decode_to_unknown():
    assert decode(b"\x7fwhatever") == Unknown(0x7F, b"whatever")
    assert decode(b"\x06") == Unknown(6, b"")


def test_session_config_validation():
    config = SessionConfig.from_handshake(Handshake({"sample_rate": 16000, "codec": "pcm16", "client": "t", "autostart": False}))
    assert config.codec == "pcm16" and config.autostart is False and config.metadata_interval == 1.0
    assert SessionConfig.from_handshake(Handshake({})).codec == "pcm16"  # everything has a default
    assert SessionConfig.from_handshake(Handshake({})).catch_up is True
    assert SessionConfig.from_handshake(Handshake({"catch_up": False})).catch_up is False
    for config, code in [
        ({"sample_rate": 8000}, ErrorCode.BAD_HANDSHAKE),
        ({"codec": "mp3"}, ErrorCode.UNSUPPORTED_CODEC),
        ({"version": 2}, ErrorCode.UNSUPPORTED_VERSION),
        ({"autostart": "yes"}, ErrorCode.BAD_HANDSHAKE),
        ({"catch_up": 1}, ErrorCode.BAD_HANDSHAKE),
        ({"metadata_interval": -1}, ErrorCode.BAD_HANDSHAKE),
        ({"token": 5}, ErrorCode.BAD_HANDSHAKE),
        ({"replies": "everyone"}, ErrorCode.BAD_HANDSHAKE),
    ]:
        with pytest.raises(ProtocolError) as info:
            SessionConfig.from_handshake(Handshake(config))
        assert info.value.code == code, config
    with pytest.raises(ProtocolError) as info:
        SessionConfig.from_handshake(Handshake({}, version=9))
    assert info.value.code == ErrorCode.UNSUPPORTED_VERSION


def test_config_control_options():
    assert protocol.parse_config_control({"send_text": False, "metadata_interval": 0}) == {"send_text": False, "metadata_interval": 0.0}
    assert protocol.parse_config_control({"replies": "client"}) == {"replies": "client"}
    assert SessionConfig.from_handshake(Handshake({"replies": "client"})).replies == "client"
    assert SessionConfig.from_handshake(Handshake({"check_rounds": 3})).check_rounds == 3
    assert protocol.parse_config_control({"check_rounds": 0}) == {"check_rounds": 0}
    for bad in (True, -1, 6, 2.5, "3"):
        with pytest.raises(ProtocolError, match="'check_rounds' must be an integer from 0 to 5"):
            protocol.parse_config_control({"check_rounds": bad})
    with pytest.raises(ProtocolError, match="unknown config option"):
        protocol.parse_config_control({"volume": 3})


@given(st.dictionaries(st.sampled_from(["text", "id", "voice"]), st.one_of(st.text(max_size=2100), st.integers(), st.none(), st.lists(st.integers()))))
@SETTINGS
def test_say_fields_are_taken_or_refused_with_a_reason(fields):
    """CONTROL say: a non-blank text of at most MAX_SAY_CHARS (kept stripped) and any id; anything else a ProtocolError."""
    try:
        text, say_id = protocol.parse_say_control(fields)
    except ProtocolError as e:
        assert str(e)
        return
    assert set(fields) <= {"text", "id"} and text == fields["text"].strip() and 0 < len(text) <= protocol.MAX_SAY_CHARS
    assert say_id == fields.get("id")


def test_pcm16_wire_rejects_odd_lengths():
    wire = protocol.Pcm16Wire()
    with pytest.raises(ProtocolError, match="even number of bytes"):
        wire.decode(b"\x00\x01\x02")
    np.testing.assert_array_equal(wire.decode(wire.encode(np.zeros(640, np.float32))), np.zeros(640, np.float32))


@pytest.mark.skipif(not protocol.opus_available(), reason="sphn (Opus) is not installed")
def test_opus_wire_round_trip():
    sender, receiver = protocol.OpusWire(), protocol.OpusWire()
    t = np.arange(16_000) / 16_000
    tone = (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    out = np.concatenate([receiver.decode(p) for i in range(0, 16_000, 640) if (p := sender.encode(tone[i : i + 640]))])
    assert len(out) >= 16_000 - 2 * 960
    level = np.sqrt(np.mean(out[4000:12000] ** 2))
    assert 0.15 < level < 0.3  # a 0.3-amplitude tone has RMS 0.21
    try:  # garbage is skipped or rejected, never a crash
        protocol.OpusWire().decode(b"definitely not ogg")
    except ProtocolError:
        pass
