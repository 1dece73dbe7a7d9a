"""speechlm.streaming: full-duplex websocket server, scheduler, protocol and clients.

protocol.py   wire format of /ws (docs/protocol.md): encode/decode, session config, PCM16/Opus
models.py     the DuplexModel step contract + EchoCodecModel / SilenceModel stand-ins
scheduler.py  frame clock + one batched model step per tick for every live session
server.py     websockets server: /ws, the page at /, /health, limits; ``speechlm serve``
client.py     Python client library and ``speechlm client``
loadtest.py   sessions held in real time (python -m speechlm.streaming.loadtest)
web/          the browser page (plain HTML/JS, AudioWorklet capture and playback)
"""
