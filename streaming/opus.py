"""Ogg/Opus on the wire without packet buffering: libopus through ctypes, one Ogg page per packet.

Each direction of a session is one Ogg/Opus stream (RFC 7845) at 16 kHz mono, cut into AUDIO payloads
(docs/protocol.md). ``sphn``'s writer codes 60 ms packets and sends a page when it has filled one, so a
40 ms frame can wait most of 60 ms before it leaves; here every 40 ms frame becomes one Opus packet on one
Ogg page at once, and only the coder's look-ahead (6.5 ms) is added (the wire's reader keeps it as delay rather
than dropping it, so that each packet's 40 ms is whole on arrival: :class:`OggOpusReader`). Any Ogg/Opus reader reads the stream
(sphn's, the browser page's, ``opusdec``), and the reader here reads any writer's stream (pages split across
payloads, packets across pages, a new stream after an end).

Needs the system's libopus (Debian ``libopus0``); :func:`libopus_available` says whether it loads, and
``streaming.protocol`` falls back to ``sphn`` where it does not.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
from functools import lru_cache

import numpy as np

OPUS_RATE = 48_000  # Ogg/Opus counts granule positions and pre-skip at 48 kHz whatever the coded rate
PACKET_MS = 40
DEFAULT_COMPLEXITY = 5  # of 10: a third less encoding time than 10 (0.30 vs 0.46 ms a frame), STOI 0.988 vs 0.990
DEFAULT_BITRATE = 16_000  # bits/s of Opus packets; Ogg's pages add ~5.6 kbit/s at 25 a second (~21 kbit/s on speech)
MAX_PAGE_BYTES = 27 + 255 + 255 * 255  # header, segment table, body
VENDOR = b"speechlm"

# libopus constants (opus_defines.h)
_APPLICATION_VOIP = 2048
_SET_BITRATE = 4002
_GET_LOOKAHEAD = 4027
_SET_SIGNAL = 4024
_SET_COMPLEXITY = 4010
_SIGNAL_VOICE = 3001
_MAX_PACKET_BYTES = 4000  # libopus's recommended output buffer


class OpusError(ValueError):
    """A corrupt or unsupported Ogg/Opus stream, or a libopus failure; the message fits one line."""


@lru_cache(maxsize=1)
def _libopus() -> ctypes.CDLL | None:
    names = [ctypes.util.find_library("opus"), "libopus.so.0", "libopus.0.dylib", "opus.dll"]
    for name in names:
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.opus_encoder_create.restype = ctypes.c_void_p
        lib.opus_encoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        lib.opus_encode_float.restype = ctypes.c_int32
        lib.opus_encode_float.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int, ctypes.c_char_p, ctypes.c_int32]
        lib.opus_encoder_destroy.argtypes = [ctypes.c_void_p]
        lib.opus_decoder_create.restype = ctypes.c_void_p
        lib.opus_decoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        lib.opus_decode_float.restype = ctypes.c_int
        lib.opus_decode_float.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_float), ctypes.c_int, ctypes.c_int]
        lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
        lib.opus_strerror.restype = ctypes.c_char_p
        lib.opus_strerror.argtypes = [ctypes.c_int]
        lib.opus_get_version_string.restype = ctypes.c_char_p
        return lib
    return None


def libopus_available() -> bool:
    return _libopus() is not None


def libopus_version() -> str | None:
    lib = _libopus()
    return lib.opus_get_version_string().decode() if lib is not None else None


def _check(lib: ctypes.CDLL, code: int, what: str) -> int:
    if code < 0:
        raise OpusError(f"libopus {what} failed: {lib.opus_strerror(code).decode()}")
    return code


class OpusEncoder:
    """libopus encoder (VOIP, voice): :meth:`encode` takes exactly one packet's samples, float32 in [-1, 1]."""

    def __init__(self, sample_rate: int = 16_000, bitrate: int = DEFAULT_BITRATE, packet_ms: int = PACKET_MS,
                 complexity: int = DEFAULT_COMPLEXITY):
        lib = _libopus()
        if lib is None:
            raise OpusError("libopus is not installed (Debian: apt-get install libopus0)")
        if packet_ms not in (10, 20, 40, 60):
            raise OpusError(f"Opus packets of {packet_ms} ms are not supported here (10, 20, 40 or 60)")
        self._lib = lib
        error = ctypes.c_int(0)
        self._state = lib.opus_encoder_create(sample_rate, 1, _APPLICATION_VOIP, ctypes.byref(error))
        _check(lib, error.value, "encoder_create")
        # opus_encoder_ctl is variadic: its int arguments go as C ints
        _check(lib, lib.opus_encoder_ctl(ctypes.c_void_p(self._state), ctypes.c_int(_SET_BITRATE), ctypes.c_int32(bitrate)), "set bitrate")
        _check(lib, lib.opus_encoder_ctl(ctypes.c_void_p(self._state), ctypes.c_int(_SET_SIGNAL), ctypes.c_int32(_SIGNAL_VOICE)), "set signal")
        _check(lib, lib.opus_encoder_ctl(ctypes.c_void_p(self._state), ctypes.c_int(_SET_COMPLEXITY), ctypes.c_int32(complexity)), "set complexity")
        lookahead = ctypes.c_int32(0)
        _check(lib, lib.opus_encoder_ctl(ctypes.c_void_p(self._state), ctypes.c_int(_GET_LOOKAHEAD), ctypes.byref(lookahead)), "get lookahead")
        self.sample_rate = sample_rate
        self.packet_samples = sample_rate * packet_ms // 1000
        self.lookahead = int(lookahead.value)  # samples at sample_rate the decoder's output runs behind
        self._out = ctypes.create_string_buffer(_MAX_PACKET_BYTES)

    def encode(self, pcm: np.ndarray) -> bytes:
        """(packet_samples,) float32 -> one Opus packet."""
        pcm = np.ascontiguousarray(pcm, dtype=np.float32)
        if pcm.shape != (self.packet_samples,):
            raise OpusError(f"an Opus packet takes {self.packet_samples} samples, got {pcm.shape}")
        pointer = pcm.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        size = _check(self._lib, self._lib.opus_encode_float(self._state, pointer, self.packet_samples, self._out, _MAX_PACKET_BYTES), "encode")
        return self._out.raw[:size]

    def __del__(self):
        state, self._state = getattr(self, "_state", None), None
        if state:
            self._lib.opus_encoder_destroy(state)


class OpusDecoder:
    """libopus decoder: :meth:`decode` turns one packet into float32 samples at ``sample_rate``."""

    def __init__(self, sample_rate: int = 16_000):
        lib = _libopus()
        if lib is None:
            raise OpusError("libopus is not installed (Debian: apt-get install libopus0)")
        self._lib = lib
        error = ctypes.c_int(0)
        self._state = lib.opus_decoder_create(sample_rate, 1, ctypes.byref(error))
        _check(lib, error.value, "decoder_create")
        self.sample_rate = sample_rate
        self._max_samples = sample_rate * 120 // 1000  # the longest Opus packet
        self._out = np.zeros(self._max_samples, dtype=np.float32)

    def decode(self, packet: bytes) -> np.ndarray:
        pointer = self._out.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        count = self._lib.opus_decode_float(self._state, packet, len(packet), pointer, self._max_samples, 0)
        if count < 0:
            raise OpusError(f"bad Opus packet: {self._lib.opus_strerror(count).decode()}")
        return self._out[:count].copy()

    def __del__(self):
        state, self._state = getattr(self, "_state", None), None
        if state:
            self._lib.opus_decoder_destroy(state)


# -- Ogg pages (RFC 3533) -----------------------------------------------------------------------


def _crc_table() -> list[int]:
    table = []
    for index in range(256):
        crc = index << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
        table.append(crc & 0xFFFFFFFF)
    return table


_CRC_TABLE = _crc_table()


def ogg_crc(data: bytes) -> int:
    """Ogg's CRC-32: polynomial 0x04c11db7, not reflected, initial value 0, no final xor."""
    crc, table = 0, _CRC_TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ table[(crc >> 24) ^ byte]
    return crc


_HEADER = struct.Struct("<4sBBqIIIB")  # capture, version, type, granule, serial, sequence, crc, segments
_CONTINUED, _BOS, _EOS = 0x01, 0x02, 0x04


def ogg_page(packets: list[bytes], granule: int, serial: int, sequence: int, bos: bool = False, eos: bool = False) -> bytes:
    """One Ogg page holding whole packets (at most 255 lacing values in all)."""
    lacing = bytearray()
    for packet in packets:
        lacing += b"\xff" * (len(packet) // 255) + bytes([len(packet) % 255])
    if len(lacing) > 255:
        raise OpusError("packets too long for one Ogg page")
    kind = (_BOS if bos else 0) | (_EOS if eos else 0)
    header = _HEADER.pack(b"OggS", 0, kind, granule, serial, sequence, 0, len(lacing))
    page = bytearray(header + lacing + b"".join(packets))
    page[22:26] = ogg_crc(page).to_bytes(4, "little")
    return bytes(page)


def opus_head(pre_skip: int, input_rate: int) -> bytes:
    """RFC 7845's identification header: version 1, mono, mapping family 0."""
    return b"OpusHead" + struct.pack("<BBHIhB", 1, 1, pre_skip, input_rate, 0, 0)


def opus_tags(vendor: bytes = VENDOR) -> bytes:
    return b"OpusTags" + struct.pack("<I", len(vendor)) + vendor + struct.pack("<I", 0)


class OggOpusWriter:
    """PCM in, an Ogg/Opus stream out, one page per packet the moment the packet is whole.

    ``write(pcm)`` takes any number of samples (a 40 ms frame at a time gives a page a call) and
    returns the bytes of the pages it completed; the first call's bytes start with the two header pages.
    """

    def __init__(self, sample_rate: int = 16_000, bitrate: int = DEFAULT_BITRATE, packet_ms: int = PACKET_MS, serial: int | None = None):
        self.encoder = OpusEncoder(sample_rate, bitrate, packet_ms)
        self.sample_rate = sample_rate
        self._scale = OPUS_RATE // sample_rate
        self._serial = serial if serial is not None else int.from_bytes(np.random.default_rng().bytes(4), "little")
        self._sequence = 0
        self._granule = 0
        self._pending = np.zeros(0, dtype=np.float32)
        self._started = False

    @property
    def pre_skip(self) -> int:
        """Samples at 48 kHz a reader drops from the start: the encoder's look-ahead."""
        return self.encoder.lookahead * self._scale

    def _page(self, packets: list[bytes], bos: bool = False, eos: bool = False) -> bytes:
        page = ogg_page(packets, self._granule, self._serial, self._sequence, bos=bos, eos=eos)
        self._sequence += 1
        return page

    def write(self, pcm: np.ndarray) -> bytes:
        out = bytearray()
        if not self._started:
            self._started = True
            out += self._page([opus_head(self.pre_skip, self.sample_rate)], bos=True)
            out += self._page([opus_tags()])
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        self._pending = np.concatenate([self._pending, pcm]) if len(self._pending) else pcm
        size = self.encoder.packet_samples
        while len(self._pending) >= size:
            packet = self.encoder.encode(self._pending[:size])
            self._pending = self._pending[size:]
            self._granule += size * self._scale
            out += self._page([packet])
        return bytes(out)


class OggReader:
    """Bytes in (any cut), whole packets out; checks each page's capture pattern, version and CRC."""

    def __init__(self, max_buffer: int = 2 * MAX_PAGE_BYTES):
        self._buffer = bytearray()
        self._partial = bytearray()  # a packet continued on the next page
        self._partial_starts = False  # whether that packet is its stream's first
        self._max_buffer = max_buffer

    def feed(self, data: bytes) -> list[tuple[bytes, bool]]:
        """Returns (packet, starts_stream) for each packet completed; ``starts_stream`` marks a BOS page's first."""
        self._buffer += data
        if len(self._buffer) > self._max_buffer:
            raise OpusError("no whole Ogg page in the bytes received")
        packets: list[tuple[bytes, bool]] = []
        if self._buffer[:4] != b"OggS"[: len(self._buffer)]:
            raise OpusError("not an Ogg page (the stream must be Ogg/Opus)")
        while len(self._buffer) >= _HEADER.size:
            capture, version, kind, _granule, _serial, _sequence, crc, count = _HEADER.unpack_from(self._buffer)
            if capture != b"OggS" or version != 0:
                raise OpusError("not an Ogg page (the stream must be Ogg/Opus)")
            if len(self._buffer) < _HEADER.size + count:
                break
            lacing = self._buffer[_HEADER.size : _HEADER.size + count]
            size = _HEADER.size + count + sum(lacing)
            if len(self._buffer) < size:
                break
            page = bytes(self._buffer[:size])
            del self._buffer[:size]
            if ogg_crc(page[:22] + bytes(4) + page[26:]) != crc:
                raise OpusError("an Ogg page's checksum does not match")
            if kind & _BOS or not kind & _CONTINUED:
                self._partial.clear()  # (a continuation that never came is dropped)
                self._partial_starts = bool(kind & _BOS)
            offset = _HEADER.size + count
            for value in lacing:
                self._partial += page[offset : offset + value]
                offset += value
                if value < 255:
                    packets.append((bytes(self._partial), self._partial_starts))
                    self._partial.clear()
                    self._partial_starts = False
        return packets


class OggOpusReader:
    """An Ogg/Opus stream's bytes in (any cut), float32 PCM at ``sample_rate`` out.

    ``drop_pre_skip`` (RFC 7845's way, for files) drops the encoder's look-ahead from the start, so the pcm lines up
    with what was coded; on the wire it is kept (``False``): the pcm then runs the look-ahead (6.5 ms) late, but each
    packet's pcm is whole when it arrives, where dropping it would leave every 40 ms frame waiting for the next
    packet's first 6.5 ms (a frame's delay for a receiver that works in whole frames, as the server does).
    """

    def __init__(self, sample_rate: int = 16_000, drop_pre_skip: bool = True):
        self.sample_rate = sample_rate
        self.drop_pre_skip = drop_pre_skip
        self._ogg = OggReader()
        self._decoder: OpusDecoder | None = None
        self._headers = 0  # header packets seen in this stream (OpusHead, OpusTags)
        self._skip = 0  # samples still to drop (pre-skip)

    def read(self, data: bytes) -> np.ndarray:
        pieces = []
        for packet, starts in self._ogg.feed(data):
            if starts:
                self._headers = 0
            if self._headers == 0:
                if not packet.startswith(b"OpusHead") or len(packet) < 19:
                    raise OpusError("an Ogg/Opus stream must start with its OpusHead")
                channels, pre_skip = packet[9], struct.unpack_from("<H", packet, 10)[0]
                if channels != 1:
                    raise OpusError(f"Opus on the wire is mono, this stream has {channels} channels")
                self._decoder = OpusDecoder(self.sample_rate)
                self._skip = pre_skip * self.sample_rate // OPUS_RATE if self.drop_pre_skip else 0
                self._headers = 1
            elif self._headers == 1:
                if not packet.startswith(b"OpusTags"):
                    raise OpusError("an OpusHead must be followed by OpusTags")
                self._headers = 2
            elif packet:  # (an empty packet would be decoded as a lost one: 120 ms of made-up sound)
                pcm = self._decoder.decode(packet)
                if self._skip:
                    dropped = min(self._skip, len(pcm))
                    pcm, self._skip = pcm[dropped:], self._skip - dropped
                pieces.append(pcm)
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
