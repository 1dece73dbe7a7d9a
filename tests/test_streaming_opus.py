"""Ogg/Opus on the wire with libopus (streaming/opus.py): no packet waits, any Ogg/Opus stream read, bad bytes refused."""

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from speechlm.streaming import opus, protocol
from speechlm.streaming.protocol import ProtocolError

pytestmark = pytest.mark.skipif(not opus.libopus_available(), reason="libopus is not installed (apt-get install libopus0)")

FRAME = 640  # 40 ms at 16 kHz


def _speechlike(seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    """A 150 Hz buzz through moving formants, syllable by syllable: something a voice coder codes as speech."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(16_000 * seconds)) / 16_000
    voice = sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 20))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    formant = np.sin(2 * np.pi * (700 + 400 * np.sin(2 * np.pi * 3 * t)) * t)
    return (0.1 * envelope * voice * (0.6 + 0.4 * formant) + 0.003 * rng.standard_normal(len(t))).astype(np.float32)


def _bitwise_crc(data: bytes) -> int:
    """RFC 3533's CRC-32 (polynomial 0x04c11db7, not reflected, initial 0), bit by bit: the reference."""
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


def _raw_page(kind: int, lacing: list[int], body: bytes) -> bytes:
    page = bytearray(b"OggS" + struct.pack("<BBqIIIB", 0, kind, 0, 2, 0, 0, len(lacing)) + bytes(lacing) + body)
    page[22:26] = _bitwise_crc(bytes(page)).to_bytes(4, "little")
    return bytes(page)


def test_crc_and_page_layout():
    rng = np.random.default_rng(1)
    for size in (0, 1, 27, 300):
        data = rng.bytes(size)
        assert opus.ogg_crc(data) == _bitwise_crc(data)
    page = opus.ogg_page([b"a" * 600, b""], granule=1920, serial=7, sequence=3, bos=True)
    assert page[:4] == b"OggS" and page[5] == 0x02 and page[26] == 4 and list(page[27:31]) == [255, 255, 90, 0]
    assert struct.unpack_from("<qII", page, 6) == (1920, 7, 3)
    assert int.from_bytes(page[22:26], "little") == _bitwise_crc(page[:22] + bytes(4) + page[26:])


def test_each_frame_leaves_at_once_and_comes_back_in_place():
    """Every 40 ms written is one page out at once (headers first), and the reader's pcm lines up with the input
    sample for sample (the look-ahead dropped as pre-skip): no packet waits for the next frame."""
    audio = _speechlike(2.0)
    writer, reader = opus.OggOpusWriter(16_000), opus.OggOpusReader(16_000)
    out, sizes = [], []
    for i in range(0, len(audio), FRAME):
        data = writer.write(audio[i : i + FRAME])
        sizes.append(len(data))
        out.append(reader.read(data))
    first = out[0]
    assert len(first) == FRAME - writer.encoder.lookahead  # the first frame's sound is out after the first write
    assert all(len(piece) == FRAME for piece in out[1:])  # and each later frame's right after its own write
    got = np.concatenate(out)
    want = audio[: len(got)]
    lags = list(range(-40, 41))
    scores = [np.dot(got[200 + lag : 30_000 + lag], want[200:30_000]) for lag in lags]
    assert lags[int(np.argmax(scores))] == 0
    assert np.corrcoef(got[200:], want[200:])[0, 1] > 0.75  # a 14 kbit/s voice coder: near, not equal
    assert abs(20 * np.log10(np.std(got) / np.std(want))) < 1.5
    kbits = 8 * sum(sizes[1:]) / (len(sizes[1:]) * 0.04) / 1000
    assert 10 < kbits < 30, kbits  # ~14 kbit/s of Opus plus 28 bytes of page a frame


def test_sphn_reads_our_stream_and_we_read_sphns():
    sphn = pytest.importorskip("sphn")
    audio = _speechlike(1.6, seed=2)
    writer, theirs = opus.OggOpusWriter(16_000), sphn.OpusStreamReader(16_000)
    heard = np.concatenate([np.asarray(theirs.append_bytes(writer.write(audio[i : i + FRAME]))) for i in range(0, len(audio), FRAME)])
    assert len(heard) >= len(audio) - 2 * FRAME and np.std(heard) > 0.5 * np.std(audio)
    their_writer, ours = sphn.OpusStreamWriter(16_000), opus.OggOpusReader(16_000)
    heard = np.concatenate([ours.read(their_writer.append_pcm(audio[i : i + FRAME])) for i in range(0, len(audio), FRAME)])
    assert len(heard) >= len(audio) - 3 * 960 and np.std(heard) > 0.5 * np.std(audio)


def test_reader_takes_any_cut_packets_across_pages_and_a_new_stream():
    audio = _speechlike(0.8, seed=3)
    stream = opus.OggOpusWriter(16_000, serial=1).write(audio)
    whole = opus.OggOpusReader(16_000).read(stream)
    reader = opus.OggOpusReader(16_000)
    pieces = np.concatenate([reader.read(stream[i : i + 7]) for i in range(0, len(stream), 7)])
    np.testing.assert_array_equal(pieces, whole)  # 7-byte pieces: the same pcm

    # one 600-byte packet split over two pages (the second "continued"), read in one piece
    packet = bytes(range(256)) * 2 + bytes(88)
    ogg = opus.OggReader()
    assert ogg.feed(_raw_page(0x02, [255, 255], packet[:510])) == []
    assert ogg.feed(_raw_page(0x01, [90], packet[510:])) == [(packet, True)]

    # a second stream after the first (a new OpusHead): read on, its pre-skip dropped again
    again = opus.OggOpusWriter(16_000, serial=9).write(audio)
    chained = opus.OggOpusReader(16_000)
    assert len(chained.read(stream + again)) == 2 * len(whole)


def test_reader_refuses_what_is_not_an_opus_stream():
    audio = _speechlike(0.2)
    stream = bytearray(opus.OggOpusWriter(16_000).write(audio))
    cases = {
        "not an Ogg page": b"RIFF" + bytes(60),
        "checksum": bytes(stream[:30]) + bytes([stream[30] ^ 1]) + bytes(stream[31:]),
        "must start with its OpusHead": opus.ogg_page([b"hello"], 0, 1, 0, bos=True),
        "no whole Ogg page": b"OggS" + bytes([0, 0]) + bytes(20) + bytes([255]) + b"\xff" * 255 + bytes(200_000),
    }
    for message, data in cases.items():
        with pytest.raises(opus.OpusError, match=message):
            opus.OggOpusReader(16_000).read(data)
    stereo = opus.ogg_page([b"OpusHead" + struct.pack("<BBHIhB", 1, 2, 312, 16000, 0, 0)], 0, 1, 0, bos=True)
    with pytest.raises(opus.OpusError, match="mono"):
        opus.OggOpusReader(16_000).read(stereo)
    with pytest.raises(opus.OpusError, match="takes 640 samples"):
        opus.OpusEncoder(16_000).encode(np.zeros(100, np.float32))


def test_wire_uses_libopus_and_sphn_when_asked(monkeypatch):
    """The wire codes with libopus by default (one page a frame, nothing held back) and with sphn when
    SPEECHLM_OPUS_BACKEND says so; the two read each other; a bad choice is a one-line error."""
    audio = _speechlike(1.2, seed=4)
    fast = protocol.OpusWire()
    assert fast.backend == "libopus"
    assert all(fast.encode(audio[i : i + FRAME]) for i in range(0, len(audio), FRAME))  # no empty payload
    monkeypatch.setenv(protocol.OPUS_BACKEND_ENV, "sphn")
    pytest.importorskip("sphn")
    slow = protocol.OpusWire()
    assert slow.backend == "sphn"
    sent = [slow.encode(audio[i : i + FRAME]) for i in range(0, len(audio), FRAME)]
    assert any(not payload for payload in sent)  # sphn's 60 ms packets: some frames send nothing yet
    monkeypatch.setenv(protocol.OPUS_BACKEND_ENV, "libopus")
    heard = np.concatenate([protocol.OpusWire().decode(b"".join(sent))])
    assert len(heard) > len(audio) // 2
    with pytest.raises(ProtocolError, match="bad Opus data"):
        protocol.OpusWire().decode(b"definitely not ogg")
    monkeypatch.setenv(protocol.OPUS_BACKEND_ENV, "vorbis")
    with pytest.raises(ProtocolError, match="must be one of libopus, sphn"):
        protocol.OpusWire()


_STREAM = opus.OggOpusWriter(16_000, serial=3).write(_speechlike(0.4, seed=5))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(0, len(_STREAM) - 1), st.integers(0, 255), st.booleans())
def test_fuzzed_streams_are_read_or_refused_never_crash(noise, at, value, recrc):
    """Random bytes, and a valid stream with one byte changed (its page's CRC made right again, so that the change
    reaches the parser and libopus): pcm or an OpusError, nothing else."""
    for data in (noise, b"OggS" + noise):
        try:
            opus.OggOpusReader(16_000).read(data)
        except opus.OpusError:
            pass
    mutated = bytearray(_STREAM)
    mutated[at] = value
    if recrc:  # the page holding the change gets its checksum recomputed
        start = bytes(mutated).rfind(b"OggS", 0, at + 1)
        if start >= 0 and len(mutated) >= start + 27:
            end = start + 27 + mutated[start + 26] + sum(mutated[start + 27 : start + 27 + mutated[start + 26]])
            page = bytearray(mutated[start:end])
            if len(page) >= 27:
                page[22:26] = bytes(4)
                page[22:26] = opus.ogg_crc(bytes(page)).to_bytes(4, "little")
                mutated[start:end] = page
    try:
        pcm = opus.OggOpusReader(16_000).read(bytes(mutated))
        assert pcm.dtype == np.float32 and np.isfinite(pcm).all()
    except opus.OpusError:
        pass
