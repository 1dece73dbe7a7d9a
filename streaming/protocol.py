"""The wire format of ``/ws``: binary websocket messages whose first byte says what they are.

    HANDSHAKE 0x00 | version u8 | UTF-8 JSON object (session config)
    AUDIO     0x01 | PCM16 little-endian 16 kHz mono samples, or a chunk of an Ogg/Opus stream
    TEXT      0x02 | UTF-8 JSON {"text", "start", "end", "speaker"}
    CONTROL   0x03 | UTF-8 JSON {"action": start|stop|interrupt|config|ping|pong, ...}
    METADATA  0x04 | UTF-8 JSON object
    ERROR     0x05 | UTF-8 JSON {"code", "message"}

``decode`` validates strictly and raises :class:`ProtocolError` (with a message fit to
send back to the peer) for anything malformed; a kind it does not know decodes to
:class:`Unknown`, which receivers ignore (newer peers may add kinds). ``docs/protocol.md``
is the reference for people writing clients; keep the two in step.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np

from ..codec.errors import SpeechLMError

VERSION = 1
SAMPLE_RATE = 16_000
FRAME_LENGTH = 640
MAX_MESSAGE_BYTES = 64 * 1024  # larger messages get an ERROR (bad_message) and are dropped
MAX_JSON_DEPTH = 8
MAX_TEXT_CHARS = 2_000
CODECS = ("pcm16", "opus")
SPEAKERS = ("model", "user")
ACTIONS = ("start", "stop", "interrupt", "config", "ping", "pong", "say")
REPLIES = ("model", "client")  # who writes a session's replies: the server's model, or the client (CONTROL say)
MAX_SAY_CHARS = 2_000
MAX_CHECK_ROUNDS = 5  # a session's transcript check ("check_rounds"), with the answer assist
MAX_OPEN_SAYS = 64  # says a session may have asked for whose end (done, interrupted, dropped) has not come yet
SAY_EVENTS = ("queued", "started", "done", "interrupted", "dropped")  # METADATA {"type": "say"}: what became of a say
SAY_ENDS = ("done", "interrupted", "dropped")  # the say events after which the model holds nothing of it (exactly one per say)
USER_EVENTS = ("started", "stopped")  # METADATA {"type": "user"}: the user began talking, or fell quiet (the answer assist's ear)


class Kind(IntEnum):
    HANDSHAKE = 0x00
    AUDIO = 0x01
    TEXT = 0x02
    CONTROL = 0x03
    METADATA = 0x04
    ERROR = 0x05


class ErrorCode:
    """Values of ERROR's ``code`` (see docs/protocol.md for when each is sent)."""

    BAD_MESSAGE = "bad_message"  # malformed message; the session lives on
    HANDSHAKE_REQUIRED = "handshake_required"  # first message was not a HANDSHAKE
    BAD_HANDSHAKE = "bad_handshake"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNSUPPORTED_CODEC = "unsupported_codec"
    UNAUTHORIZED = "unauthorized"
    SERVER_FULL = "server_full"
    TOO_MANY_ERRORS = "too_many_errors"
    IDLE_TIMEOUT = "idle_timeout"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"


class ProtocolError(SpeechLMError, ValueError):
    """A message that does not follow the protocol; ``code`` is the ERROR code to answer with."""

    def __init__(self, message: str, code: str = ErrorCode.BAD_MESSAGE):
        super().__init__(message)
        self.code = code


# -- messages ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Handshake:
    config: dict[str, Any]  # session config (client -> server) or accepted config (server -> client)
    version: int = VERSION


@dataclass(frozen=True)
class Audio:
    payload: bytes  # PCM16 LE samples or Opus stream bytes, as negotiated

    def pcm16(self) -> np.ndarray:
        """The payload as float32 samples in [-1, 1) (PCM16 sessions only)."""
        return np.frombuffer(self.payload, dtype="<i2").astype(np.float32) / 32768.0

    @classmethod
    def from_pcm(cls, pcm: np.ndarray) -> Audio:
        """float32 samples in [-1, 1] -> a PCM16 AUDIO message."""
        return cls(pcm_to_bytes(pcm))


@dataclass(frozen=True)
class Text:
    text: str
    start: float  # seconds since the session's stream started
    end: float
    speaker: str  # "model" or "user"


@dataclass(frozen=True)
class Control:
    action: str
    fields: dict[str, Any] = field(default_factory=dict)  # everything besides "action"


@dataclass(frozen=True)
class Metadata:
    data: dict[str, Any]


@dataclass(frozen=True)
class Error:
    code: str
    message: str


@dataclass(frozen=True)
class Unknown:
    kind: int
    payload: bytes


Message = Handshake | Audio | Text | Control | Metadata | Error | Unknown


# -- encoding ------------------------------------------------------------------------------


def pcm_to_bytes(pcm: np.ndarray) -> bytes:
    """float32 samples in [-1, 1] (clipped) -> PCM16 little-endian bytes."""
    return (np.clip(np.asarray(pcm, dtype=np.float32), -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def _json(obj: dict[str, Any]) -> bytes:
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (ValueError, TypeError) as e:  # NaN, lone surrogates, objects JSON cannot hold
        raise ProtocolError(f"cannot encode as JSON: {e}") from None


def encode(message: Message) -> bytes:
    """A message -> the bytes of one binary websocket message. Raises ProtocolError for invalid fields."""
    if isinstance(message, Handshake):
        if not 0 <= message.version <= 255:
            raise ProtocolError(f"version must fit in one byte, got {message.version}")
        return bytes([Kind.HANDSHAKE, message.version]) + _json(message.config)
    if isinstance(message, Audio):
        return bytes([Kind.AUDIO]) + bytes(message.payload)
    if isinstance(message, Text):
        _check_text(message)
        body = {"text": message.text, "start": message.start, "end": message.end, "speaker": message.speaker}
        return bytes([Kind.TEXT]) + _json(body)
    if isinstance(message, Control):
        if message.action not in ACTIONS:
            raise ProtocolError(f"unknown control action {message.action!r} (known: {', '.join(ACTIONS)})")
        return bytes([Kind.CONTROL]) + _json({**message.fields, "action": message.action})
    if isinstance(message, Metadata):
        return bytes([Kind.METADATA]) + _json(message.data)
    if isinstance(message, Error):
        return bytes([Kind.ERROR]) + _json({"code": message.code, "message": message.message})
    if isinstance(message, Unknown):
        return bytes([message.kind]) + message.payload
    raise TypeError(f"not a protocol message: {type(message).__name__}")


# -- decoding ------------------------------------------------------------------------------


def decode(data: bytes | bytearray | memoryview | str, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """The bytes of one websocket message -> a message.

    Raises ProtocolError for text frames, empty or oversized messages, bad JSON, missing or
    mistyped fields. Unknown kinds decode to :class:`Unknown` (to be ignored).
    """
    if isinstance(data, str):
        raise ProtocolError("text websocket frames are not part of the protocol: send binary messages")
    data = bytes(data)
    if not data:
        raise ProtocolError("empty message: the first byte must be the message kind")
    if len(data) > max_bytes:
        raise ProtocolError(f"message of {len(data)} bytes is over the {max_bytes}-byte limit")
    kind, payload = data[0], data[1:]
    if kind == Kind.HANDSHAKE:
        if not payload:
            raise ProtocolError("HANDSHAKE is missing its version byte", ErrorCode.BAD_HANDSHAKE)
        return Handshake(config=_object(payload[1:], "HANDSHAKE", ErrorCode.BAD_HANDSHAKE), version=payload[0])
    if kind == Kind.AUDIO:
        if not payload:
            raise ProtocolError("AUDIO message with no audio")
        return Audio(payload)
    if kind == Kind.TEXT:
        body = _object(payload, "TEXT")
        for name, types in (("text", str), ("start", (int, float)), ("end", (int, float)), ("speaker", str)):
            if name not in body:
                raise ProtocolError(f"TEXT is missing {name!r}")
            if not isinstance(body[name], types) or isinstance(body[name], bool):
                raise ProtocolError(f"TEXT field {name!r} has the wrong type ({type(body[name]).__name__})")
        try:
            message = Text(body["text"], float(body["start"]), float(body["end"]), body["speaker"])
        except OverflowError:
            raise ProtocolError("TEXT times are out of range") from None
        _check_text(message)
        return message
    if kind == Kind.CONTROL:
        body = _object(payload, "CONTROL")
        action = body.pop("action", None)
        if not isinstance(action, str):
            raise ProtocolError("CONTROL needs a string 'action'")
        if action not in ACTIONS:
            raise ProtocolError(f"unknown control action {action[:40]!r} (known: {', '.join(ACTIONS)})")
        return Control(action, body)
    if kind == Kind.METADATA:
        return Metadata(_object(payload, "METADATA"))
    if kind == Kind.ERROR:
        body = _object(payload, "ERROR")
        if not isinstance(body.get("code"), str) or not isinstance(body.get("message"), str):
            raise ProtocolError("ERROR needs string 'code' and 'message'")
        return Error(body["code"], body["message"])
    return Unknown(kind, payload)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _object(payload: bytes, what: str, code: str = ErrorCode.BAD_MESSAGE) -> dict[str, Any]:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(f"{what} payload is not UTF-8 ({e.reason} at byte {e.start})", code) from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"{what} payload is not valid JSON: {str(e)[:120]}", code) from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} payload must be a JSON object, got {type(obj).__name__}", code)
    if _depth(obj) > MAX_JSON_DEPTH:
        raise ProtocolError(f"{what} payload nests deeper than {MAX_JSON_DEPTH} levels", code)
    return obj


def _depth(obj: Any, level: int = 1) -> int:
    if level > MAX_JSON_DEPTH:
        return level
    if isinstance(obj, dict):
        return max((_depth(v, level + 1) for v in obj.values()), default=level)
    if isinstance(obj, list):
        return max((_depth(v, level + 1) for v in obj), default=level)
    return level


def _check_text(message: Text) -> None:
    if len(message.text) > MAX_TEXT_CHARS:
        raise ProtocolError(f"TEXT text is longer than {MAX_TEXT_CHARS} characters")
    try:
        message.text.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError("TEXT text holds a lone surrogate (not valid Unicode)") from None
    if not (math.isfinite(message.start) and math.isfinite(message.end)) or message.start < 0 or message.end < message.start:
        raise ProtocolError(f"TEXT times must satisfy 0 <= start <= end, got start={message.start} end={message.end}")
    if message.speaker not in SPEAKERS:
        raise ProtocolError(f"TEXT speaker must be one of {', '.join(SPEAKERS)}, got {message.speaker[:40]!r}")


# -- session config (the client's HANDSHAKE) -----------------------------------------------


@dataclass(frozen=True)
class SessionConfig:
    """What a client asks for in its HANDSHAKE. Unknown keys are ignored (forward compatible)."""

    sample_rate: int = SAMPLE_RATE
    codec: str = "pcm16"
    client: str = ""
    token: str | None = None
    autostart: bool = True  # join the batch at the first AUDIO (else wait for CONTROL start)
    send_text: bool = True
    metadata_interval: float = 1.0  # seconds between METADATA stats; 0 turns them off
    voice: str | None = None  # the voice the model's replies are said in (one of the server's; None: its default)
    replies: str = "model"  # who writes the replies: the server's model, or "client" (the session's CONTROL say)
    check_rounds: int | None = None  # rounds of the transcript check on this session's questions (None: the server's)
    catch_up: bool = True  # drain a lasting input backlog (a network stall's) by skipping quiet frames; off for files sent fast

    @classmethod
    def from_handshake(cls, message: Handshake, server_sample_rate: int = SAMPLE_RATE) -> SessionConfig:
        """Validate a client HANDSHAKE. Raises ProtocolError with the right ERROR code."""
        config = message.config
        if message.version != VERSION or config.get("version", VERSION) != VERSION:
            raise ProtocolError(
                f"protocol version {message.version} is not supported (this server speaks version {VERSION})", ErrorCode.UNSUPPORTED_VERSION
            )
        sample_rate = config.get("sample_rate", server_sample_rate)
        if not isinstance(sample_rate, int) or isinstance(sample_rate, bool) or sample_rate != server_sample_rate:
            raise ProtocolError(f"sample_rate must be {server_sample_rate}, got {sample_rate!r}", ErrorCode.BAD_HANDSHAKE)
        codec = config.get("codec", "pcm16")
        if codec not in CODECS:
            raise ProtocolError(f"codec must be one of {', '.join(CODECS)}, got {str(codec)[:40]!r}", ErrorCode.UNSUPPORTED_CODEC)
        if codec == "opus" and not opus_available():
            raise ProtocolError("this server cannot speak Opus (neither libopus nor sphn is installed): use pcm16", ErrorCode.UNSUPPORTED_CODEC)
        client = config.get("client", "")
        token = config.get("token")
        if not isinstance(client, str) or (token is not None and not isinstance(token, str)):
            raise ProtocolError("'client' and 'token' must be strings", ErrorCode.BAD_HANDSHAKE)
        flags = {}
        for name in ("autostart", "send_text", "catch_up"):
            value = config.get(name, getattr(cls, name))
            if not isinstance(value, bool):
                raise ProtocolError(f"{name!r} must be true or false", ErrorCode.BAD_HANDSHAKE)
            flags[name] = value
        interval = _metadata_interval(config.get("metadata_interval", cls.metadata_interval), ErrorCode.BAD_HANDSHAKE)
        voice = config.get("voice")
        if voice is not None:
            voice = _voice(voice, ErrorCode.BAD_HANDSHAKE)
        replies = _replies(config.get("replies", cls.replies), ErrorCode.BAD_HANDSHAKE)
        rounds = config.get("check_rounds")
        rounds = None if rounds is None else _check_rounds(rounds, ErrorCode.BAD_HANDSHAKE)
        return cls(sample_rate=sample_rate, codec=codec, client=client[:200], token=token, metadata_interval=interval, voice=voice,
                   replies=replies, check_rounds=rounds, **flags)  # fmt: skip


def _metadata_interval(value: Any, code: str = ErrorCode.BAD_MESSAGE) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (value == 0 or 0.1 <= value <= 3600):
        raise ProtocolError("'metadata_interval' must be 0 (off) or between 0.1 and 3600 seconds", code)
    return float(value)


def _voice(value: Any, code: str = ErrorCode.BAD_MESSAGE) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        raise ProtocolError("'voice' must be a voice's name (a string of 1 to 64 characters)", code)
    return value


def _replies(value: Any, code: str = ErrorCode.BAD_MESSAGE) -> str:
    if value not in REPLIES:
        raise ProtocolError(f"'replies' must be one of {', '.join(REPLIES)}, got {str(value)[:40]!r}", code)
    return value


def _check_rounds(value: Any, code: str = ErrorCode.BAD_MESSAGE) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_CHECK_ROUNDS:
        raise ProtocolError(f"'check_rounds' must be an integer from 0 to {MAX_CHECK_ROUNDS}, got {str(value)[:40]}", code)
    return value


def parse_config_control(fields: dict[str, Any]) -> dict[str, Any]:
    """Validate the fields of CONTROL ``config``: ``send_text`` (bool), ``metadata_interval`` (s), ``voice`` (a name;
    whether the server has it is the server's to check), ``replies`` (``model`` or ``client``), ``check_rounds`` (0 to
    MAX_CHECK_ROUNDS)."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if name == "send_text":
            if not isinstance(value, bool):
                raise ProtocolError("'send_text' must be true or false")
            out[name] = value
        elif name == "metadata_interval":
            out[name] = _metadata_interval(value)
        elif name == "voice":
            out[name] = _voice(value)
        elif name == "replies":
            out[name] = _replies(value)
        elif name == "check_rounds":
            out[name] = _check_rounds(value)
        elif name != "id":
            raise ProtocolError(f"unknown config option {name[:40]!r} (known: send_text, metadata_interval, voice, replies, check_rounds)")
    return out


def parse_say_control(fields: dict[str, Any]) -> tuple[str, Any]:
    """Validate the fields of CONTROL ``say``: ``text`` (1 to MAX_SAY_CHARS characters, not only spaces) and an optional
    ``id`` (any JSON value, echoed in the say's METADATA events). Returns (text, id)."""
    unknown = sorted(set(fields) - {"text", "id"})
    if unknown:
        raise ProtocolError(f"unknown say field {unknown[0][:40]!r} (known: text, id)")
    text = fields.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ProtocolError("say needs a non-empty string 'text'")
    if len(text) > MAX_SAY_CHARS:
        raise ProtocolError(f"say text is longer than {MAX_SAY_CHARS} characters ({len(text)}): send it in parts, one say each")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError("say text holds a lone surrogate (not valid Unicode)") from None
    return text.strip(), fields.get("id")


# -- audio on the wire ---------------------------------------------------------------------


OPUS_BACKENDS = ("libopus", "sphn")
OPUS_BACKEND_ENV = "SPEECHLM_OPUS_BACKEND"  # force one (benchmarks compare them); by default libopus when it loads


def opus_backend() -> str | None:
    """Which Opus coder this process uses: ``libopus`` (one page per 40 ms packet, no waiting), ``sphn``
    (60 ms packets, pages when full: up to ~50 ms more delay each way), or None (no Opus here)."""
    from .opus import libopus_available

    wanted = os.environ.get(OPUS_BACKEND_ENV, "").strip().lower()
    if wanted and wanted not in OPUS_BACKENDS:
        raise ProtocolError(f"{OPUS_BACKEND_ENV} must be one of {', '.join(OPUS_BACKENDS)}, got {wanted!r}", ErrorCode.UNSUPPORTED_CODEC)
    if wanted in ("", "libopus") and libopus_available():
        return "libopus"
    if wanted in ("", "sphn"):
        try:
            import sphn  # noqa: F401
        except ImportError:
            return None
        return "sphn"
    return None


def opus_available() -> bool:
    return opus_backend() is not None


class Pcm16Wire:
    """PCM16 little-endian mono: one AUDIO payload is any whole number of samples."""

    name = "pcm16"

    def encode(self, pcm: np.ndarray) -> bytes:
        return pcm_to_bytes(pcm)

    def decode(self, payload: bytes) -> np.ndarray:
        if len(payload) % 2:
            raise ProtocolError(f"PCM16 AUDIO must have an even number of bytes, got {len(payload)}")
        return np.frombuffer(payload, dtype="<i2").astype(np.float32) / 32768.0


class OpusWire:
    """An Ogg/Opus stream cut into AUDIO payloads; one encoder and one decoder per session.

    With libopus (``streaming.opus``) each whole 40 ms of pcm given to :meth:`encode` leaves at once as one
    packet on one Ogg page; with ``sphn`` (the fallback) packets are 60 ms and pages go when full, so
    payloads may be empty (those are not sent). Either reads any Ogg/Opus stream. Decoding returns whatever
    pcm the stream has completed so far.
    """

    name = "opus"

    def __init__(self, sample_rate: int = SAMPLE_RATE):
        self.backend = opus_backend()
        if self.backend is None:
            raise ProtocolError("Opus needs libopus (Debian: libopus0) or the sphn package (pip install sphn)", ErrorCode.UNSUPPORTED_CODEC)
        if self.backend == "libopus":
            from .opus import OggOpusReader, OggOpusWriter

            writer, reader = OggOpusWriter(sample_rate), OggOpusReader(sample_rate, drop_pre_skip=False)
            self.packet_ms = writer.encoder.packet_samples * 1000 // sample_rate
            self._write, self._read = writer.write, reader.read
        else:
            import sphn

            writer, reader = sphn.OpusStreamWriter(sample_rate), sphn.OpusStreamReader(sample_rate)
            self.packet_ms = 60  # sphn's writer
            self._write = lambda pcm: writer.append_pcm(np.ascontiguousarray(pcm, dtype=np.float32))
            self._read = lambda payload: np.asarray(reader.append_bytes(payload), dtype=np.float32)

    def encode(self, pcm: np.ndarray) -> bytes:
        return self._write(pcm)

    def decode(self, payload: bytes) -> np.ndarray:
        try:
            return self._read(payload)
        except Exception as e:  # either coder's errors for a corrupt stream
            raise ProtocolError(f"bad Opus data: {str(e)[:120]}") from None


def wire_codec(name: str, sample_rate: int = SAMPLE_RATE) -> Pcm16Wire | OpusWire:
    if name == "pcm16":
        return Pcm16Wire()
    if name == "opus":
        return OpusWire(sample_rate)
    raise ProtocolError(f"codec must be one of {', '.join(CODECS)}, got {name!r}", ErrorCode.UNSUPPORTED_CODEC)
