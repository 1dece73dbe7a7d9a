// Opus on the websocket for the speechlm page (HANDSHAKE "codec": "opus", docs/protocol.md).
//
// Each direction is one Ogg/Opus stream (RFC 7845) at 16 kHz, cut into AUDIO payloads. The browser's WebCodecs
// (AudioEncoder / AudioDecoder) code the Opus packets; this file frames the microphone's packets in Ogg pages
// (RFC 3533: one 40 ms packet a page, one page an AUDIO message) and reads the server's pages back into packets.
// WebCodecs needs a secure context: https, or the page on localhost / 127.0.0.1.
// Plain JS, no build step; loaded before app.js, which uses OpusUplink, OpusDownlink and opusSupported.

const OPUS_RATE = 16000; // the wire's sample rate
const OPUS_GRANULE_RATE = 48000; // Ogg/Opus counts granule positions at 48 kHz whatever the input rate
const OPUS_ENCODER_CONFIG = {
  codec: "opus",
  sampleRate: OPUS_RATE,
  numberOfChannels: 1,
  bitrate: 24000,
  opus: { frameDuration: 40000, application: "voip", signal: "voice" }, // one packet per 40 ms frame
};
const OPUS_DECODER_CONFIG = { codec: "opus", sampleRate: OPUS_RATE, numberOfChannels: 1 };
const OGG_MAX_PACKET = 1 << 16; // a longer packet is a corrupt stream, not speech

const OGG_CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let r = i << 24;
    for (let j = 0; j < 8; j++) r = r & 0x80000000 ? (r << 1) ^ 0x04c11db7 : r << 1;
    table[i] = r >>> 0;
  }
  return table;
})();

function oggCrc(bytes) {
  let crc = 0;
  for (let i = 0; i < bytes.length; i++) crc = ((crc << 8) ^ OGG_CRC_TABLE[((crc >>> 24) ^ bytes[i]) & 0xff]) >>> 0;
  return crc;
}

function asciiBytes(text) {
  return Uint8Array.from(text, (c) => c.charCodeAt(0));
}

function concatBytes(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

// One Ogg page of whole packets. flags: 2 = first page of the stream.
function oggPage(packets, { serial, sequence, granule, flags = 0 }) {
  const lacing = [];
  for (const packet of packets) {
    let n = packet.length;
    for (; n >= 255; n -= 255) lacing.push(255);
    lacing.push(n); // a value under 255 ends the packet (0 after a multiple of 255)
  }
  if (lacing.length > 255) throw new Error("an Ogg page holds at most 255 segments");
  const body = concatBytes(packets);
  const page = new Uint8Array(27 + lacing.length + body.length);
  const view = new DataView(page.buffer);
  page.set(asciiBytes("OggS"));
  page[5] = flags;
  view.setBigUint64(6, BigInt(granule), true);
  view.setUint32(14, serial, true);
  view.setUint32(18, sequence, true);
  page[26] = lacing.length;
  page.set(lacing, 27);
  page.set(body, 27 + lacing.length);
  view.setUint32(22, oggCrc(page), true); // computed with the CRC field zero
  return page;
}

// RFC 7845 identification header: mono, `preSkip` samples at 48 kHz to drop, the input's rate.
function opusHead(preSkip, inputRate) {
  const head = new Uint8Array(19);
  const view = new DataView(head.buffer);
  head.set(asciiBytes("OpusHead"));
  head[8] = 1; // version
  head[9] = 1; // channels
  view.setUint16(10, preSkip, true);
  view.setUint32(12, inputRate, true);
  return head; // output gain 0, channel mapping family 0
}

function opusTags(vendor) {
  const name = asciiBytes(vendor);
  const tags = new Uint8Array(8 + 4 + name.length + 4);
  tags.set(asciiBytes("OpusTags"));
  new DataView(tags.buffer).setUint32(8, name.length, true);
  tags.set(name, 12);
  return tags; // no comments
}

function startsWith(bytes, text) {
  return bytes.length >= text.length && Array.from(text).every((c, i) => bytes[i] === c.charCodeAt(0));
}

// The packets of an Ogg stream that arrives in arbitrary pieces (a page may be split across messages, a packet
// continued across pages). push() throws on bytes that are not Ogg.
class OggReader {
  constructor() {
    this.buffer = new Uint8Array(0);
    this.partial = []; // the pieces of a packet continued on the next page
    this.partialBytes = 0;
  }

  push(bytes) {
    this.buffer = this.buffer.length ? concatBytes([this.buffer, bytes]) : bytes;
    const packets = [];
    for (;;) {
      const b = this.buffer;
      if (b.length < 27) break;
      if (!startsWith(b, "OggS")) throw new Error("the server's audio is not an Ogg stream");
      const segments = b[26];
      if (b.length < 27 + segments) break;
      let size = 0;
      for (let i = 0; i < segments; i++) size += b[27 + i];
      if (b.length < 27 + segments + size) break;
      let at = 27 + segments;
      for (let i = 0; i < segments; i++) {
        const n = b[27 + i];
        this.partial.push(b.slice(at, at + n));
        this.partialBytes += n;
        at += n;
        if (this.partialBytes > OGG_MAX_PACKET) throw new Error("an Ogg packet over 64 KiB: a corrupt stream");
        if (n < 255) {
          packets.push(concatBytes(this.partial));
          this.partial = [];
          this.partialBytes = 0;
        }
      }
      this.buffer = b.slice(at);
    }
    return packets;
  }
}

// Whether this browser can speak Opus on the wire (WebCodecs, in a secure context).
async function opusSupported() {
  if (typeof AudioEncoder === "undefined" || typeof AudioDecoder === "undefined") return false;
  try {
    const [enc, dec] = await Promise.all([
      AudioEncoder.isConfigSupported(OPUS_ENCODER_CONFIG),
      AudioDecoder.isConfigSupported(OPUS_DECODER_CONFIG),
    ]);
    return Boolean(enc.supported && dec.supported);
  } catch (error) {
    return false;
  }
}

// Microphone frames (Int16Array, 16 kHz) -> the bytes of an Ogg/Opus stream, through onBytes(Uint8Array):
// the two header pages with the first packet, then one page per 40 ms packet.
class OpusUplink {
  constructor(onBytes, onError) {
    this.onBytes = onBytes;
    this.serial = (Math.random() * 0x100000000) >>> 0;
    this.sequence = 0;
    this.granule = 0;
    this.samples = 0;
    this.encoder = new AudioEncoder({ output: (chunk, meta) => this.output(chunk, meta), error: onError });
    this.encoder.configure(OPUS_ENCODER_CONFIG);
  }

  encode(int16) {
    const data = new AudioData({
      format: "s16",
      sampleRate: OPUS_RATE,
      numberOfFrames: int16.length,
      numberOfChannels: 1,
      timestamp: Math.round((this.samples * 1e6) / OPUS_RATE),
      data: int16,
    });
    this.samples += int16.length;
    this.encoder.encode(data);
    data.close();
  }

  page(packet, granuleStep, flags) {
    this.granule += granuleStep;
    return oggPage([packet], { serial: this.serial, sequence: this.sequence++, granule: this.granule, flags });
  }

  output(chunk, meta) {
    const pages = [];
    if (this.sequence === 0) {
      // the encoder's own identification header says its pre-skip; 312 (6.5 ms) is libopus's usual
      const description = meta && meta.decoderConfig && meta.decoderConfig.description;
      const head = description ? new Uint8Array(description.buffer || description) : null;
      const preSkip = head && startsWith(head, "OpusHead") && head.length >= 12 ? head[10] | (head[11] << 8) : 312;
      pages.push(this.page(opusHead(preSkip, OPUS_RATE), 0, 2), this.page(opusTags("speechlm-web"), 0, 0));
    }
    const packet = new Uint8Array(chunk.byteLength);
    chunk.copyTo(packet);
    const micros = chunk.duration || OPUS_ENCODER_CONFIG.opus.frameDuration;
    pages.push(this.page(packet, Math.round((micros * OPUS_GRANULE_RATE) / 1e6), 0));
    this.onBytes(concatBytes(pages));
  }

  close() {
    if (this.encoder.state !== "closed") this.encoder.close();
  }
}

// The server's Ogg/Opus bytes -> 16 kHz Float32Array chunks, through onPcm.
class OpusDownlink {
  constructor(onPcm, onError) {
    this.onPcm = onPcm;
    this.reader = new OggReader();
    this.timestamp = 0;
    this.resampler = null;
    this.decoder = new AudioDecoder({ output: (data) => this.output(data), error: onError });
    this.decoder.configure(OPUS_DECODER_CONFIG);
  }

  push(bytes) {
    for (const packet of this.reader.push(bytes)) {
      if (startsWith(packet, "OpusHead") || startsWith(packet, "OpusTags")) continue;
      this.decoder.decode(new EncodedAudioChunk({ type: "key", timestamp: this.timestamp, data: packet }));
      this.timestamp += 20000; // (WebCodecs wants increasing timestamps; the decoder's output keeps the order)
    }
  }

  output(data) {
    const pcm = new Float32Array(data.numberOfFrames);
    data.copyTo(pcm, { planeIndex: 0, format: "f32-planar" });
    const rate = data.sampleRate;
    data.close();
    if (rate === OPUS_RATE) {
      this.onPcm(pcm);
      return;
    }
    if (!this.resampler || this.resampler.from !== rate) this.resampler = new LinearResampler(rate, OPUS_RATE);
    this.onPcm(this.resampler.push(pcm)); // (Opus at a 16 kHz input keeps under 8 kHz: no filter needed)
  }

  close() {
    if (this.decoder.state !== "closed") this.decoder.close();
  }
}

// Linear interpolation from one rate to another across chunks.
class LinearResampler {
  constructor(from, to) {
    this.from = from;
    this.step = from / to; // input samples per output sample
    this.position = 0; // the next output's place in the next chunk's samples (-1: the last chunk's last sample)
    this.previous = 0;
  }

  push(input) {
    const out = [];
    let p = this.position;
    for (; p <= input.length - 1; p += this.step) {
      const i = Math.floor(p);
      const frac = p - i;
      const left = i < 0 ? this.previous : input[i];
      out.push(frac > 0 ? left + (input[i + 1] - left) * frac : left);
    }
    this.position = p - input.length;
    if (input.length) this.previous = input[input.length - 1];
    return Float32Array.from(out);
  }
}
