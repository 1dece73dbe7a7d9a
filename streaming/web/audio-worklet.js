// AudioWorklet processors for the speechlm page (loaded with audioWorklet.addModule).
//
// capture-processor:  microphone at the context rate -> low-pass + linear resampling to 16 kHz
//                     -> Int16 frames of `frameLength` samples, posted to the page (transferred).
// playback-processor: 16 kHz Float32 chunks from the page -> jitter buffer -> linear upsampling
//                     to the context rate. Starts after `prebufferMs`, plays silence and
//                     re-buffers on underrun, drops the oldest audio beyond `maxBufferMs`, and
//                     drains a lasting backlog (a network stall's) by dropping quiet frames as
//                     they come (`catchUp`, on unless false: CatchUp below).

const WIRE_RATE = 16000;
const FRAME = 640; // the wire's 40 ms frame

// numpy's percentile (linear interpolation) of an ascending array
function percentile(sorted, p) {
  const at = (p / 100) * (sorted.length - 1);
  const low = Math.floor(at);
  const high = Math.min(low + 1, sorted.length - 1);
  return sorted[low] + (sorted[high] - sorted[low]) * (at - low);
}

// Drains a lasting backlog in the quiet, the same rule as the server's (streaming/catchup.py): when more than
// `cushion` frames have stayed queued through `window` frames (a second), a quiet frame may go, one a frame. Quiet:
// at most twice the noise floor (5th percentile of the last 250 frames' RMS, at least 1e-4), where their 90th
// percentile is at least four times the floor (a steady sound has nothing quiet in it).
class CatchUp {
  constructor(cushion, window = 25) {
    this.cushion = cushion;
    this.window = window;
    this.backlogs = [];
    this.levels = [];
    this.skipped = 0;
  }

  skip(level, backlog) {
    this.levels.push(level);
    if (this.levels.length > 250) this.levels.shift();
    this.backlogs.push(backlog);
    if (this.backlogs.length > this.window) this.backlogs.shift();
    if (this.backlogs.length < this.window || Math.min(...this.backlogs) <= this.cushion || !this.isQuiet(level)) return false;
    this.skipped++;
    this.backlogs = this.backlogs.map((b) => b - 1); // one frame less now
    return true;
  }

  underrun() {
    this.backlogs = [];
  }

  isQuiet(level) {
    const sorted = Float64Array.from(this.levels).sort();
    const floor = Math.max(1e-4, percentile(sorted, 5));
    return level <= 2 * floor && percentile(sorted, 90) >= 4 * floor;
  }
}

function rms(pcm) {
  let sum = 0;
  for (let i = 0; i < pcm.length; i++) sum += pcm[i] * pcm[i];
  return pcm.length ? Math.sqrt(sum / pcm.length) : 0;
}

// Windowed-sinc low-pass (Hamming), cutoff as a fraction of the sample rate.
function lowpass(cutoff, taps) {
  const h = new Float32Array(taps);
  const mid = (taps - 1) / 2;
  let sum = 0;
  for (let i = 0; i < taps; i++) {
    const x = i - mid;
    const sinc = x === 0 ? 2 * cutoff : Math.sin(2 * Math.PI * cutoff * x) / (Math.PI * x);
    h[i] = sinc * (0.54 - 0.46 * Math.cos((2 * Math.PI * i) / (taps - 1)));
    sum += h[i];
  }
  for (let i = 0; i < taps; i++) h[i] /= sum;
  return h;
}

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = (options && options.processorOptions) || {};
    this.frameLength = o.frameLength || 640;
    this.step = sampleRate / WIRE_RATE; // input samples per output sample
    this.taps = this.step > 1 ? lowpass(0.45 / this.step, 31) : null; // anti-aliasing before decimation
    this.history = new Float32Array(this.taps ? this.taps.length : 1);
    this.historyIndex = 0;
    this.previous = 0;
    this.position = 1; // where the next output sample falls, in input samples after `previous`
    this.frame = new Int16Array(this.frameLength);
    this.filled = 0;
  }

  filter(x) {
    if (!this.taps) return x;
    const n = this.taps.length;
    this.history[this.historyIndex] = x;
    let y = 0;
    let j = this.historyIndex;
    for (let i = 0; i < n; i++) {
      y += this.taps[i] * this.history[j];
      j = j === 0 ? n - 1 : j - 1;
    }
    this.historyIndex = (this.historyIndex + 1) % n;
    return y;
  }

  emit(sample) {
    const s = Math.max(-1, Math.min(1, sample));
    this.frame[this.filled++] = Math.round(s * 32767);
    if (this.filled === this.frameLength) {
      this.port.postMessage(this.frame.buffer, [this.frame.buffer]);
      this.frame = new Int16Array(this.frameLength);
      this.filled = 0;
    }
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0) return true;
    const channels = input.length;
    const length = input[0].length;
    for (let k = 0; k < length; k++) {
      let x = 0;
      for (let c = 0; c < channels; c++) x += input[c][k];
      const current = this.filter(x / channels);
      while (this.position <= 1) {
        this.emit(this.previous + (current - this.previous) * this.position);
        this.position += this.step;
      }
      this.position -= 1;
      this.previous = current;
    }
    return true;
  }
}

class PlaybackProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = (options && options.processorOptions) || {};
    this.step = WIRE_RATE / sampleRate; // wire samples per output sample
    this.prebuffer = Math.round(((o.prebufferMs || 80) * WIRE_RATE) / 1000);
    this.maxBuffer = Math.round(((o.maxBufferMs || 1000) * WIRE_RATE) / 1000);
    this.chunks = [];
    this.offset = 0; // read position in chunks[0]
    this.size = 0; // samples queued
    this.playing = false;
    this.previous = 0;
    this.current = 0;
    this.position = 1;
    this.underruns = 0;
    this.dropped = 0;
    this.skippedSamples = 0;
    this.catchUp = o.catchUp === false ? null : new CatchUp(Math.ceil(this.prebuffer / FRAME)); // to the prebuffer
    this.lastReport = 0;
    this.port.onmessage = (event) => {
      const data = event.data;
      if (data.type === "audio") {
        if (this.playing && this.catchUp && this.catchUp.skip(rms(data.pcm), Math.floor(this.size / FRAME))) {
          this.skippedSamples += data.pcm.length;
          return;
        }
        this.chunks.push(data.pcm);
        this.size += data.pcm.length;
        while (this.size > this.maxBuffer && this.chunks.length > 1) {
          const old = this.chunks.shift();
          this.size -= old.length - this.offset;
          this.dropped += old.length - this.offset;
          this.offset = 0;
        }
      } else if (data.type === "clear") {
        this.chunks = [];
        this.size = this.offset = 0;
        this.playing = false;
      }
    };
  }

  next() {
    if (this.size === 0) return null;
    const chunk = this.chunks[0];
    const sample = chunk[this.offset++];
    this.size--;
    if (this.offset === chunk.length) {
      this.chunks.shift();
      this.offset = 0;
    }
    return sample;
  }

  process(inputs, outputs) {
    const output = outputs[0];
    const out = output[0];
    for (let i = 0; i < out.length; i++) {
      if (!this.playing) {
        if (this.size < this.prebuffer) {
          out[i] = 0;
          continue;
        }
        this.playing = true;
      }
      while (this.position >= 1) {
        const sample = this.next();
        if (sample === null) {
          this.underruns++;
          this.playing = false;
          if (this.catchUp) this.catchUp.underrun();
          break;
        }
        this.previous = this.current;
        this.current = sample;
        this.position -= 1;
      }
      out[i] = this.playing ? this.previous + (this.current - this.previous) * this.position : 0;
      if (this.playing) this.position += this.step;
    }
    for (let c = 1; c < output.length; c++) output[c].set(out);
    if (currentTime - this.lastReport > 0.25) {
      this.lastReport = currentTime;
      this.port.postMessage({
        type: "stats",
        bufferedMs: (1000 * this.size) / WIRE_RATE,
        underruns: this.underruns,
        droppedMs: (1000 * this.dropped) / WIRE_RATE,
        skippedMs: (1000 * this.skippedSamples) / WIRE_RATE,
      });
    }
    return true;
  }
}

registerProcessor("capture-processor", CaptureProcessor);
registerProcessor("playback-processor", PlaybackProcessor);
