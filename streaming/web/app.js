// The speechlm voice page: websocket protocol (docs/protocol.md), mic capture and playback
// through audio-worklet.js, transcripts and a latency readout. Plain JS, no build step.
//
// URL options: ?token=SECRET fills the token box; ?voice=NAME asks for that voice at connect; ?codec=opus chooses
// Opus on the wire (opus.js; PCM16 by default);
// ?autoconnect=1 connects on load (tests); ?say=TEXT has the model say TEXT once connected (tests);
// window.speechlm exposes the live numbers for automated checks.
//
// A busy server (ERROR server_full: too many sessions, or the load too high for another) is tried again
// every RETRY_MS until RETRY_FOR_MS have passed since the first refusal; Disconnect stops trying.

const KIND = { HANDSHAKE: 0, AUDIO: 1, TEXT: 2, CONTROL: 3, METADATA: 4, ERROR: 5 };
const VERSION = 1;
const WIRE_RATE = 16000;
const FRAME_LENGTH = 640;
const RETRY_MS = 2000;
const RETRY_FOR_MS = 60000;

const $ = (id) => document.getElementById(id);
const encoder = new TextEncoder();
const decoder = new TextDecoder();

const state = {
  ws: null,
  context: null,
  capture: null,
  playback: null,
  mic: null,
  pingTimer: null,
  busy: false, // this connection was refused with server_full
  busySince: null, // when the first refusal of this try came (performance.now())
  retryTimer: null,
  pings: new Map(),
  nextPing: 1,
  uplink: null, // OpusUplink / OpusDownlink when the wire is Opus
  downlink: null,
  connectedAt: null,
  stats: {
    connected: false,
    session: null,
    codec: null, // the wire's audio codec, as the server accepted it
    opusPacketMs: null, // the server's Opus packet length (HANDSHAKE reply opus_packet_ms)
    bytesSent: 0, // AUDIO payload bytes each way
    bytesReceived: 0,
    samplesReceived: 0,
    receivedLevelDb: null, // the model audio's level (dBFS RMS) over the last 0.2 s
    voice: null,
    voices: [],
    framesSent: 0,
    framesReceived: 0,
    rttMs: null,
    playbackMs: 0,
    playbackUnderruns: 0,
    playbackSkippedMs: 0, // quiet model audio dropped to drain a stall's backlog (the worklet's catch-up)
    server: {},
    transcripts: { user: "", model: "" },
    errors: [],
    busyRefusals: 0,
    canSay: false, // the server's HANDSHAKE reply: CONTROL say works here
    says: [], // the server's say events: {id, event}
    userTalking: false, // the server hears the user talking (METADATA user events, with the answer assist)
  },
};
window.speechlm = state.stats;

function message(kind, json, version) {
  const body = encoder.encode(JSON.stringify(json));
  const head = version === undefined ? [kind] : [kind, version];
  const out = new Uint8Array(head.length + body.length);
  out.set(head);
  out.set(body, head.length);
  return out;
}

function send(kind, json, version) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(message(kind, json, version));
}

function setStatus(text, kind) {
  $("status").textContent = text;
  $("status").className = kind || "";
}

async function connect() {
  if (state.ws) return;
  $("connect").disabled = true;
  setStatus("starting audio…");
  try {
    state.context = new AudioContext();
    await state.context.audioWorklet.addModule("audio-worklet.js");
    state.playback = new AudioWorkletNode(state.context, "playback-processor", {
      numberOfInputs: 0,
      outputChannelCount: [1],
      processorOptions: { prebufferMs: Number($("prebuffer").value) || 80, maxBufferMs: 1000 },
    });
    state.playback.port.onmessage = (event) => {
      state.stats.playbackMs = event.data.bufferedMs;
      state.stats.playbackUnderruns = event.data.underruns;
      state.stats.playbackSkippedMs = event.data.skippedMs || 0;
      render();
    };
    state.playback.connect(state.context.destination);
  } catch (error) {
    setStatus(`audio failed: ${error}`, "error");
    teardown();
    return;
  }
  let codec = $("codec").value;
  $("codec").disabled = true;
  if (codec === "opus" && !(await opusSupported())) {
    codec = "pcm16"; // WebCodecs is missing, or the page is not in a secure context (https or localhost)
    $("codec").value = codec;
    setStatus("this browser cannot code Opus here (needs WebCodecs over https or on localhost): using PCM16", "error");
    if (!state.context) return; // Disconnect while it was asked
  } else {
    setStatus("connecting…");
  }
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const token = $("token").value.trim();
  const url = `${scheme}://${location.host}/ws` + (token ? `?token=${encodeURIComponent(token)}` : "");
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  ws.onopen = () => {
    const config = { version: VERSION, sample_rate: WIRE_RATE, codec, client: "speechlm-web/1" };
    const voice = new URLSearchParams(location.search).get("voice");
    if (voice) config.voice = voice;
    send(KIND.HANDSHAKE, config, VERSION);
  };
  ws.onmessage = (event) => onMessage(event.data);
  ws.onerror = () => setStatus("websocket error (is the server running?)", "error");
  ws.onclose = (event) => {
    const why = event.reason ? `${event.code} ${event.reason}` : `${event.code}`;
    const busy = state.busy || event.code === 1013;
    teardown();
    if (busy && retryWhileBusy()) return;
    setStatus(`disconnected (${why})`, event.code === 1000 ? "" : "error");
  };
}

// The server said it is full: connect again in RETRY_MS, unless it has said so for RETRY_FOR_MS already.
function retryWhileBusy() {
  state.busySince = state.busySince ?? performance.now();
  const waited = performance.now() - state.busySince;
  if (waited >= RETRY_FOR_MS) {
    state.busySince = null;
    setStatus(`server busy for ${Math.round(waited / 1000)} s: try again later`, "error");
    return false;
  }
  setStatus(`server busy: trying again in ${RETRY_MS / 1000} s…`, "error");
  $("connect").disabled = true;
  $("disconnect").disabled = false; // stops the retries
  state.retryTimer = setTimeout(() => {
    state.retryTimer = null;
    connect();
  }, RETRY_MS);
  return true;
}

function stopRetrying() {
  clearTimeout(state.retryTimer);
  Object.assign(state, { retryTimer: null, busySince: null });
}

async function startMicrophone() {
  try {
    state.mic = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
  } catch (error) {
    setStatus(`microphone unavailable: ${error.message || error}`, "error");
    return;
  }
  const source = state.context.createMediaStreamSource(state.mic);
  state.capture = new AudioWorkletNode(state.context, "capture-processor", {
    numberOfOutputs: 1,
    processorOptions: { frameLength: FRAME_LENGTH },
  });
  state.capture.port.onmessage = (event) => {
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return;
    if (state.uplink) state.uplink.encode(new Int16Array(event.data)); // its pages go out through sendAudio
    else sendAudio(new Uint8Array(event.data));
    state.stats.framesSent++;
  };
  const mute = state.context.createGain();
  mute.gain.value = 0; // the capture node must be pulled by the graph, but not heard
  source.connect(state.capture).connect(mute).connect(state.context.destination);
}

function sendAudio(payload) {
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return;
  const out = new Uint8Array(1 + payload.length);
  out[0] = KIND.AUDIO;
  out.set(payload, 1);
  state.ws.send(out);
  state.stats.bytesSent += payload.length;
}

// the wire is Opus (the server's HANDSHAKE reply said so): the microphone's frames and the model's audio go
// through WebCodecs (opus.js)
function startOpus() {
  const failed = (error) => {
    setStatus(`Opus failed: ${error.message || error}`, "error");
    teardown();
  };
  state.uplink = new OpusUplink(sendAudio, failed);
  state.downlink = new OpusDownlink(play, failed);
}

function play(pcm) {
  if (!state.playback || pcm.length === 0) return;
  const s = state.stats;
  s.samplesReceived += pcm.length;
  s.framesReceived = Math.floor(s.samplesReceived / FRAME_LENGTH);
  let power = 0;
  for (let i = 0; i < pcm.length; i++) power += pcm[i] * pcm[i];
  const db = 10 * Math.log10(power / pcm.length + 1e-10);
  const keep = Math.exp(-pcm.length / (0.2 * WIRE_RATE)); // a level over about the last 0.2 s
  s.receivedLevelDb = s.receivedLevelDb === null ? db : 10 * Math.log10(keep * 10 ** (s.receivedLevelDb / 10) + (1 - keep) * 10 ** (db / 10));
  state.playback.port.postMessage({ type: "audio", pcm }, [pcm.buffer]);
}

function onMessage(data) {
  const bytes = new Uint8Array(data);
  if (bytes.length === 0) return;
  const kind = bytes[0];
  if (kind === KIND.AUDIO) {
    state.stats.bytesReceived += bytes.length - 1;
    if (state.downlink) {
      try {
        state.downlink.push(bytes.subarray(1));
      } catch (error) {
        setStatus(`bad Opus from the server: ${error.message || error}`, "error");
        teardown();
      }
      return;
    }
    const samples = new Int16Array(data.slice(1));
    const pcm = new Float32Array(samples.length);
    for (let i = 0; i < samples.length; i++) pcm[i] = samples[i] / 32768;
    play(pcm);
    return;
  }
  let body;
  try {
    body = JSON.parse(decoder.decode(bytes.subarray(kind === KIND.HANDSHAKE ? 2 : 1)));
  } catch (error) {
    return; // not ours to understand
  }
  if (kind === KIND.HANDSHAKE) {
    stopRetrying();
    state.stats.connected = true;
    state.stats.session = body.session;
    state.stats.codec = body.codec;
    state.stats.opusPacketMs = body.opus_packet_ms || 60; // the server's Opus packets (older servers: sphn's 60 ms)
    state.connectedAt = performance.now();
    setStatus(`connected: session ${body.session}, ${body.model}, ${body.codec}`, "ok");
    if (body.codec === "opus") startOpus();
    showVoices(body.voices || [], body.voice);
    $("disconnect").disabled = false;
    $("interrupt").disabled = false;
    state.stats.canSay = body.say === true;
    $("say").disabled = $("say-text").disabled = !state.stats.canSay;
    const greeting = new URLSearchParams(location.search).get("say");
    if (greeting && state.stats.canSay) say(greeting);
    startMicrophone();
    state.pingTimer = setInterval(ping, 1000);
  } else if (kind === KIND.TEXT) {
    addText(body.speaker, body.text);
  } else if (kind === KIND.CONTROL && body.action === "pong") {
    const sent = state.pings.get(body.id);
    if (sent !== undefined) {
      state.pings.delete(body.id);
      state.stats.rttMs = performance.now() - sent;
    }
  } else if (kind === KIND.METADATA && body.type === "stats") {
    state.stats.server = body;
  } else if (kind === KIND.METADATA && body.type === "say") {
    state.stats.says.push({ id: body.id, event: body.event });
    $("say-state").textContent = `say ${body.id}: ${body.event}`;
  } else if (kind === KIND.METADATA && body.type === "user") {
    state.stats.userTalking = body.event === "started";
    $("user-state").textContent = state.stats.userTalking ? "· talking" : "";
  } else if (kind === KIND.METADATA && body.type === "config" && body.voice) {
    state.stats.voice = body.voice;
  } else if (kind === KIND.ERROR && body.code === "server_full") {
    state.busy = true; // the close that follows tries again (retryWhileBusy)
    state.stats.busyRefusals++;
    setStatus(`server busy: ${body.message}`, "error");
  } else if (kind === KIND.ERROR) {
    state.stats.errors.push(body);
    if (body.code === "unsupported_codec") $("codec").value = "pcm16"; // the next Connect uses what the server has
    setStatus(`server error ${body.code}: ${body.message}`, "error");
  }
  render();
}

// the server's voices (its HANDSHAKE reply): choosing one sends CONTROL config, which the next reply follows
function showVoices(voices, voice) {
  const select = $("voice");
  select.replaceChildren(...voices.map((name) => new Option(name, name, false, name === voice)));
  select.disabled = voices.length < 2;
  Object.assign(state.stats, { voice, voices });
}

function chooseVoice() {
  send(KIND.CONTROL, { action: "config", voice: $("voice").value });
}

function addText(speaker, text) {
  const who = speaker === "user" ? "user" : "model";
  // pieces carry their own leading space when they start a word (docs/protocol.md)
  state.stats.transcripts[who] += text;
  $(`${who}-text`).textContent = state.stats.transcripts[who];
}

function ping() {
  const id = state.nextPing++;
  state.pings.set(id, performance.now());
  if (state.pings.size > 20) state.pings.delete(state.pings.keys().next().value);
  send(KIND.CONTROL, { action: "ping", id, t: Date.now() / 1000 });
}

// CONTROL say: the model says the text at its next turn; METADATA say events tell what became of it
let nextSay = 1;
function say(text) {
  text = (text ?? $("say-text").value).trim();
  if (!text) return;
  send(KIND.CONTROL, { action: "say", text, id: nextSay++ });
  $("say-text").value = "";
}

function interrupt() {
  send(KIND.CONTROL, state.stats.canSay ? { action: "interrupt", reply: true } : { action: "interrupt" });
  if (state.playback) state.playback.port.postMessage({ type: "clear" });
}

function render() {
  const s = state.stats;
  const server = s.server || {};
  const frameMs = (1000 * FRAME_LENGTH) / WIRE_RATE;
  const queueMs = (server.output_queue_frames || 0) * frameMs;
  $("rtt").textContent = s.rttMs === null ? "–" : `${s.rttMs.toFixed(1)} ms`;
  $("playback").textContent = `${s.playbackMs.toFixed(0)} ms (underruns ${s.playbackUnderruns}, caught up ${s.playbackSkippedMs.toFixed(0)} ms)`;
  $("server-queue").textContent = `${queueMs.toFixed(0)} ms, dropped ${server.dropped_frames || 0} frames`;
  $("server-input").textContent = `${server.input_ms ?? "–"} ms, underruns ${server.underruns ?? "–"}`;
  $("server-step").textContent = server.server_step_ms_p50 == null ? "–" : `${server.server_step_ms_p50} ms (batch ${server.server_batch})`;
  // mouth-to-ear: one-way network + server input buffer + one frame of model delay + output queue + playback buffer
  // (+ with Opus, the coders' look-ahead both ways, ~13 ms, and, where the server's packets are longer than a frame
  // (sphn's 60 ms), their wait: ~90 ms more in all)
  const oneWay = s.rttMs === null ? 0 : s.rttMs / 2;
  const opusMs = s.codec === "opus" ? (s.opusPacketMs > frameMs ? 100 : 13) : 0;
  const total = 2 * oneWay + (server.input_ms || 0) + frameMs + queueMs + s.playbackMs + opusMs;
  $("total").textContent = `≈ ${total.toFixed(0)} ms`;
  $("frames").textContent = `${s.framesSent} sent / ${s.framesReceived} received`;
  const seconds = state.connectedAt === null ? 0 : (performance.now() - state.connectedAt) / 1000;
  const kbps = (bytes) => (seconds > 0 ? ((8 * bytes) / seconds / 1000).toFixed(1) : "–");
  $("wire").textContent = s.codec ? `${s.codec}: ${kbps(s.bytesSent)} kbit/s up, ${kbps(s.bytesReceived)} down` : "–";
  $("level").textContent = s.receivedLevelDb === null ? "–" : `${s.receivedLevelDb.toFixed(1)} dBFS`;
}

function teardown() {
  clearInterval(state.pingTimer);
  state.pingTimer = null;
  if (state.mic) state.mic.getTracks().forEach((track) => track.stop());
  if (state.context) state.context.close();
  if (state.ws && state.ws.readyState <= WebSocket.OPEN) state.ws.close(1000, "bye");
  if (state.uplink) state.uplink.close();
  if (state.downlink) state.downlink.close();
  Object.assign(state, { ws: null, context: null, capture: null, playback: null, mic: null, busy: false, uplink: null, downlink: null });
  state.stats.connected = false;
  $("connect").disabled = false;
  $("disconnect").disabled = true;
  $("interrupt").disabled = true;
  $("voice").disabled = true;
  $("codec").disabled = false;
  $("say").disabled = $("say-text").disabled = true;
}

window.addEventListener("DOMContentLoaded", () => {
  const params = new URLSearchParams(location.search);
  if (params.get("token")) $("token").value = params.get("token");
  if (params.get("codec") === "opus") $("codec").value = "opus";
  $("connect").onclick = connect;
  $("disconnect").onclick = () => {
    stopRetrying();
    setStatus("disconnected");
    teardown();
  };
  $("interrupt").onclick = interrupt;
  $("voice").onchange = chooseVoice;
  $("say").onclick = () => say();
  $("say-text").onkeydown = (event) => event.key === "Enter" && say();
  render();
  if (params.get("autoconnect") === "1") connect();
});
