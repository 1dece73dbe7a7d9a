"""The full-duplex websocket server: ``/ws`` for sessions, ``/`` for the browser page.

The server only moves bytes and enforces limits; the :class:`~.scheduler.Scheduler`
runs the model. Per connection::

    HANDSHAKE ──► validate, authorise ──► HANDSHAKE reply
    reader task: recv ─► decode ─► AUDIO into the jitter buffer (waits when full: back-pressure)
                                  CONTROL ─► start / stop / interrupt / config / ping
                                  malformed ─► ERROR bad_message (the session lives on;
                                               after ``max_bad_messages`` it is closed)
    writer task: ERROR/CONTROL replies first, then output frames (AUDIO + TEXT), METADATA stats

Limits (``ServerConfig``): loopback bind unless a token is set, origin allow-list and a
Host check against DNS rebinding, ``max_sessions`` (the extra client gets ERROR
server_full and a close), message size (``max_message_bytes`` -> ERROR, ``max_frame_bytes``
-> the connection is closed with 1009), idle timeout, bounded per-session memory (see
``scheduler.py``: the oldest output frames are dropped for a reader that falls behind).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import hmac
import http
import json
import logging
import re
import signal
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from ..codec.errors import SpeechLMError
from . import protocol
from .models import DuplexModel
from .protocol import Audio, Control, ErrorCode, Handshake, Metadata, ProtocolError, SessionConfig, Text
from .scheduler import Scheduler, StreamSession
from .settings import LOOPBACK_NAMES, WEB_DIR, ServerConfig, add_serve_arguments, config_from_args, is_loopback  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

CANNOT_SAY = "this server cannot say texts or take replies from the client: it needs the answer assist (speechlm serve --assist NAME) speaking in the speech LM's voice"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}

# Load-based admission (ServerConfig.admit_load): the reading needs this many ticks with a step (2 s of 40 ms
# frames) in the window, and a load with more than this share of its ticks late is at capacity whatever its step time.
ADMIT_MIN_TICKS = 50
ADMIT_LATE_SHARE = 0.05
# ... and, for a model with an answer assist, this many ticks with a reply under way, more than ADMIT_LATE_SHARE of
# them with a gap in a reply (its speech made slower than it plays: AssistedDuplexModel.assist_load)
ADMIT_MIN_SPEECH_TICKS = 25

# Websocket close codes (RFC 6455).
CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_POLICY, CLOSE_INTERNAL, CLOSE_TRY_LATER = 1000, 1001, 1008, 1011, 1013


def _response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            ("Connection", "close"),
        ]
    )
    return Response(status, http.HTTPStatus(status).phrase, headers, body)


class DuplexServer:
    """Websocket server + scheduler around one :class:`DuplexModel`.

    ::

        async with DuplexServer(model, ServerConfig(port=0)) as server:
            print(server.url)                      # ws://127.0.0.1:PORT/ws
            ...
    """

    def __init__(self, model: DuplexModel, config: ServerConfig | None = None):
        self.config = config = config or ServerConfig()
        config.check()
        self.model = model
        self.scheduler = Scheduler(
            model, max_sessions=config.max_sessions, input_seconds=config.input_seconds, output_seconds=config.output_seconds
        )
        self.scheduler.on_error = self._on_model_error
        self.connections: set[_Connection] = set()
        self.counters = collections.Counter()  # connections, rejected, bad_messages, ...
        self._authorized: weakref.WeakKeyDictionary[ServerConnection, bool] = weakref.WeakKeyDictionary()
        self._server = None
        self._static = self._load_static(config.web_dir)
        self.port: int | None = None
        self.started_at = time.time()

    def voices(self) -> list[str]:
        """The voices a session may ask for in its HANDSHAKE (``voice``), the server's default first: the model's
        (``voices()``, e.g. the answer assist's speech LM voices), else only ``default``."""
        voices = getattr(self.model, "voices", None)
        return list(voices()) if voices is not None else ["default"]

    def can_say(self) -> bool:
        """Whether sessions may ask the model to say texts (CONTROL ``say``), write its replies (``replies: client``) and
        stop its reply (CONTROL ``interrupt`` ``reply``): the model has ``say_rows`` and ``hush_rows`` and can (the
        answer assist, speaking in the speech LM's voice)."""
        can = getattr(self.model, "can_say", None)
        return hasattr(self.model, "say_rows") and hasattr(self.model, "hush_rows") and (can is None or bool(can()))

    def check_rounds(self) -> int | None:
        """The rounds of the transcript check the model's answer assist gives a session's questions by default (None:
        a model that hears no questions)."""
        return getattr(getattr(self.model, "config", None), "asr_check_rounds", None)

    def voice_error(self, voice: str) -> str | None:
        """Why a session cannot ask for ``voice`` (None: it can)."""
        voices = self.voices()
        return None if voice in voices else f"this server has no voice {voice!r}; it speaks: {', '.join(voices)}"

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> DuplexServer:
        await self.scheduler.start()
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            process_request=self._process_request,
            max_size=self.config.max_frame_bytes,
            max_queue=8,  # at most 8 frames of 256 KiB buffered per connection before TCP back-pressure
            write_limit=32 * 1024,
            compression=None,  # PCM does not deflate well and deflate costs CPU per frame
            open_timeout=self.config.handshake_timeout,
            close_timeout=2,
            ping_interval=20,
            ping_timeout=20,
            server_header="speechlm",
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("serving %s (page http://%s:%d/)", self.url, self._display_host, self.port)
        return self

    async def stop(self, reason: str = "server shutting down") -> None:
        """Tell every client why (ERROR shutting_down), close them with 1001, stop the clock."""
        if self._server is None:
            return
        self._server.close(close_connections=False)  # stop accepting
        connections = list(self.connections)
        for connection in connections:
            connection.fail(ErrorCode.SHUTTING_DOWN, reason, CLOSE_GOING_AWAY)
        if connections:
            await asyncio.wait([asyncio.create_task(c.finished.wait()) for c in connections], timeout=3)
        for connection in connections:  # whoever did not finish in time
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.ws.close(CLOSE_GOING_AWAY, reason), 1)
        await self.scheduler.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 3)
        self._server = None

    async def __aenter__(self) -> DuplexServer:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def _display_host(self) -> str:
        host = self.config.host or "0.0.0.0"
        return f"[{host}]" if ":" in host else host

    @property
    def url(self) -> str:
        return f"ws://{self._display_host}:{self.port}/ws"

    def stats(self) -> dict[str, Any]:
        readings = self._readings()
        return {
            "uptime_s": round(time.time() - self.started_at, 1),
            "connections": len(self.connections),
            "max_sessions": self.config.max_sessions,
            "admitting": self._busy(*readings) is None and len(self.connections) < self.config.max_sessions,
            "load": readings[0],
            "assist_load": readings[1],
            **self.scheduler.snapshot(),
            **dict(self.counters),
        }

    # -- HTTP side (page, health) and admission of websocket upgrades ----------------------

    def _load_static(self, web_dir: Path) -> dict[str, tuple[bytes, str]]:
        files: dict[str, tuple[bytes, str]] = {}
        if web_dir.is_dir():
            for path in sorted(web_dir.iterdir()):
                if path.is_file() and path.suffix in CONTENT_TYPES and re.fullmatch(r"[A-Za-z0-9._-]+", path.name):
                    files["/" + path.name] = (path.read_bytes(), CONTENT_TYPES[path.suffix])
        if "/index.html" in files:
            files["/"] = files["/index.html"]
        return files

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        query = parse_qs(url.query)
        if url.path == "/ws":
            problem = self._check_host_and_origin(request.headers)
            if problem:
                self.counters["rejected_origin"] += 1
                return _response(403, f"{problem}\n".encode())
            if self.config.token and "token" in query:
                if not hmac.compare_digest(query["token"][0].encode(), self.config.token.encode()):
                    self.counters["rejected_token"] += 1
                    return _response(401, b"bad token\n")
                self._authorized[connection] = True
            return None  # go on with the websocket handshake
        if url.path == "/health":
            if self.config.token and not hmac.compare_digest(query.get("token", [""])[0].encode(), self.config.token.encode()):
                return _response(401, b"token required: /health?token=...\n")
            return _response(200, json.dumps(self.stats()).encode(), "application/json")
        if url.path in self._static:
            body, content_type = self._static[url.path]
            return _response(200, body, content_type)
        return _response(404, b"not found: the websocket endpoint is /ws, the page is /\n")

    def _check_host_and_origin(self, headers: Headers) -> str | None:
        host_header = headers.get("Host", "")
        if not self.config.token and is_loopback(self.config.host):
            # A loopback server without a token trusts the machine; refuse foreign Host names
            # so that a web page cannot reach it through DNS rebinding.
            hostname = urlsplit(f"//{host_header}").hostname or ""
            if hostname not in LOOPBACK_NAMES and not is_loopback(hostname):
                return f"Host {host_header!r} is not a loopback name"
        origin = headers.get("Origin")
        if origin is None or "*" in self.config.allowed_origins or origin in self.config.allowed_origins:
            return None  # not a browser, or an allowed one
        if urlsplit(origin).netloc == host_header:
            return None  # the page this server serves
        return f"origin {origin!r} is not allowed (add it with --allow-origin)"

    # -- websocket sessions ------------------------------------------------------------------

    def capacity_error(self) -> str | None:
        """Why a new session is refused for the load (None: it is not): over the last ``admit_window`` seconds of
        ticks (at least ``ADMIT_MIN_TICKS`` of them with a step), the model step's p90 above ``admit_load`` of the
        frame period, or more than ``ADMIT_LATE_SHARE`` of the ticks late; or, with an answer assist, its replies'
        speech falling behind (``ADMIT_MIN_SPEECH_TICKS``). Connections that arrive together are judged on the same
        reading."""
        busy = self._busy(*self._readings())
        return busy[1] if busy is not None else None

    def _readings(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The clock's load and, with an answer assist (speechlm.streaming.assist), its speech's, over ``admit_window``."""
        reading = getattr(self.model, "assist_load", None)
        window = self.config.admit_window
        return self.scheduler.load(window), reading(window) if reading is not None else None

    def _busy(self, load: dict[str, Any] | None, speech: dict[str, Any] | None) -> tuple[str, str] | None:
        """(what is at capacity: "step" or "speech", why) or None, from :meth:`_readings`; see :meth:`capacity_error`."""
        if self.config.admit_load is None or not self.connections:
            return None  # (with no session open the reading is of sessions gone: the first is always let in)
        sessions = self.scheduler.live_sessions
        if load is not None and load["ticks"] >= ADMIT_MIN_TICKS and (
            load["step_p90_share"] > self.config.admit_load or load["late_share"] > ADMIT_LATE_SHARE
        ):
            return "step", (f"server busy: at its real-time capacity with {sessions} sessions (model step p90 "
                            f"{load['step_p90_share']:.0%} of a frame, {load['late_share']:.0%} of ticks late); try again later")
        if speech is not None and speech["ticks"] >= ADMIT_MIN_SPEECH_TICKS and speech["starved_share"] > ADMIT_LATE_SHARE:
            return "speech", (f"server busy: the replies' speech falls behind with {sessions} sessions "
                              f"({speech['starved_share']:.0%} of the ticks of replies under way had a gap); try again later")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        authorized = self._authorized.pop(ws, False)
        full = None
        if len(self.connections) >= self.config.max_sessions:
            self.counters["rejected_full"] += 1
            full = f"server full: {self.config.max_sessions} sessions are running; try again later"
        elif (busy := self._busy(*self._readings())) is not None:
            self.counters["rejected_busy"] += 1
            self.counters[f"rejected_busy_{busy[0]}"] += 1  # which limit: the model step or the replies' speech
            full = busy[1]
            log.info("refused a session: %s", full)
        if full is not None:
            with contextlib.suppress(ConnectionClosed):
                await ws.send(protocol.encode(protocol.Error(ErrorCode.SERVER_FULL, full)))
                await ws.close(CLOSE_TRY_LATER, "server full")
            return
        connection = _Connection(self, ws, authorized)
        self.connections.add(connection)  # no await since the check above: no race
        self.counters["connections"] += 1
        try:
            await connection.run()
        finally:
            self.connections.discard(connection)

    def _on_model_error(self, error: Exception, sessions: list[StreamSession]) -> None:
        for connection in list(self.connections):
            if connection.session in sessions:
                connection.fail(ErrorCode.INTERNAL, f"the model failed: {type(error).__name__}", CLOSE_INTERNAL)


class _Connection:
    """One websocket session: handshake, then a reader and a writer task until either ends."""

    def __init__(self, server: DuplexServer, ws: ServerConnection, authorized: bool):
        self.server = server
        self.config = server.config
        self.ws = ws
        self.authorized = authorized or not server.config.token
        self.scheduler = server.scheduler
        self.session: StreamSession | None = None
        self.session_config = SessionConfig()
        self.wire = None
        self.events: collections.deque[bytes] = collections.deque()
        self.events_dropped = 0
        self.bad_messages = 0
        self.ignored_messages = 0
        self.paused = False  # CONTROL stop: audio is ignored until CONTROL start
        self.close_code: int | None = None
        self.close_reason = ""
        self.closing = asyncio.Event()
        self.finished = asyncio.Event()
        self._wake = asyncio.Event()
        self.last_message = time.monotonic()
        self.next_metadata = 0.0

    # -- outgoing ------------------------------------------------------------------------

    def queue(self, message: protocol.Message) -> None:
        """Queue a reply for the writer (bounded: the oldest reply is dropped when full)."""
        if len(self.events) >= self.config.max_pending_events:
            self.events.popleft()
            self.events_dropped += 1
        self.events.append(protocol.encode(message))
        self._wake.set()

    def fail(self, code: str, message: str, close_code: int = CLOSE_POLICY) -> None:
        """Send ERROR ``code`` and close the connection once it is out."""
        if self.closing.is_set():
            return
        self.queue(protocol.Error(code, message))
        self.close_code, self.close_reason = close_code, message[:120]  # close reasons are capped at 123 bytes
        self.closing.set()
        self._wake.set()

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self) -> None:
        try:
            if await self._handshake():
                self._wake = self.session.output.ready  # the scheduler's pushes and our replies wake one writer
                reader = asyncio.create_task(self._read(), name=f"read-{self.session.id}")
                writer = asyncio.create_task(self._write(), name=f"write-{self.session.id}")
                timer = asyncio.create_task(self._timer(), name=f"timer-{self.session.id}")
                closing = asyncio.create_task(self.closing.wait())
                await asyncio.wait({reader, writer, closing}, return_when=asyncio.FIRST_COMPLETED)
                reader.cancel()
                if self.closing.is_set() and not writer.done():  # let the writer flush the final ERROR, briefly
                    self._wake.set()
                    with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, ConnectionClosed):
                        await asyncio.wait_for(asyncio.shield(writer), 1.0)
                for task in (reader, writer, timer, closing):
                    task.cancel()
                for task, outcome in zip(
                    (reader, writer, timer), await asyncio.gather(reader, writer, timer, closing, return_exceptions=True)
                ):
                    if isinstance(outcome, Exception) and not isinstance(outcome, ConnectionClosed):
                        log.error("session %s: %s task failed", self.session.id, task.get_name(), exc_info=outcome)
            else:
                await self._flush_events()
            if self.close_code is not None:
                with contextlib.suppress(ConnectionClosed):
                    await self.ws.close(self.close_code, self.close_reason)
        except ConnectionClosed:
            pass
        finally:
            if self.session is not None:
                self.scheduler.close_session(self.session)
            self.finished.set()

    async def _flush_events(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            while self.events:
                await self.ws.send(self.events.popleft())

    async def _handshake(self) -> bool:
        """Wait for the client's HANDSHAKE; on success open the scheduler session and answer."""
        try:
            data = await asyncio.wait_for(self.ws.recv(), self.config.handshake_timeout)
        except asyncio.TimeoutError:
            self.fail(ErrorCode.HANDSHAKE_REQUIRED, f"no HANDSHAKE within {self.config.handshake_timeout:g} s")
            return False
        try:
            message = protocol.decode(data, self.config.max_message_bytes)
            if not isinstance(message, Handshake):
                raise ProtocolError("the first message must be a HANDSHAKE (kind 0x00)", ErrorCode.HANDSHAKE_REQUIRED)
            config = SessionConfig.from_handshake(message, self.scheduler.sample_rate)
            self.wire = protocol.wire_codec(config.codec, self.scheduler.sample_rate)
        except ProtocolError as e:
            self.server.counters["bad_handshakes"] += 1
            self.fail(e.code, str(e))
            return False
        if not self.authorized:
            given = (config.token or "").encode()
            if not hmac.compare_digest(given, self.config.token.encode()):
                self.server.counters["rejected_token"] += 1
                self.fail(ErrorCode.UNAUTHORIZED, "this server needs a token: pass ?token=... in the URL or 'token' in the HANDSHAKE")
                return False
        error = self.server.voice_error(config.voice) if config.voice is not None else None
        if config.replies == "client" and not self.server.can_say():
            error = CANNOT_SAY
        if error:
            self.server.counters["bad_handshakes"] += 1
            self.fail(ErrorCode.BAD_HANDSHAKE, error)
            return False
        self.session_config = config
        self.paused = not config.autostart
        self.session = self.scheduler.open_session()
        self.session.catch_up = config.catch_up
        if config.voice is not None:
            self.session.options = {"voice": config.voice}
        if config.replies != "model":
            self.session.options["replies"] = config.replies
        if config.check_rounds is not None:
            self.session.options["check_rounds"] = config.check_rounds
        voices = self.server.voices()
        reply = {
            "version": protocol.VERSION,
            "session": self.session.id,
            "sample_rate": self.scheduler.sample_rate,
            "frame_length": self.scheduler.frame_length,
            "codec": config.codec,
            "voice": config.voice or voices[0],
            "voices": voices,
            "replies": config.replies,
            "say": self.server.can_say(),
            "check_rounds": config.check_rounds if config.check_rounds is not None else self.server.check_rounds(),
            "server": "speechlm",
            "model": type(self.server.model).__name__,
            "max_message_bytes": self.config.max_message_bytes,
            "idle_timeout": self.config.idle_timeout,
            "input_seconds": self.config.input_seconds,
            "output_seconds": self.config.output_seconds,
        }
        if config.codec == "opus":
            reply["opus_packet_ms"] = self.wire.packet_ms
        await self.ws.send(protocol.encode(Handshake(reply)))
        return True

    # -- reader ------------------------------------------------------------------------

    async def _read(self) -> None:
        # A plain await on recv (no wait_for): on Python 3.11 wait_for can swallow a cancellation
        # that races with a message arriving, and the reader would then outlive its connection.
        session = self.session
        while True:
            try:
                data = await self.ws.recv()
            except ConnectionClosed:
                return
            self.last_message = time.monotonic()
            try:
                message = protocol.decode(data, self.config.max_message_bytes)
                await self._dispatch(message, session)
            except ProtocolError as e:
                self.bad_messages += 1
                self.server.counters["bad_messages"] += 1
                if self.bad_messages >= self.config.max_bad_messages:
                    self.fail(ErrorCode.TOO_MANY_ERRORS, f"{self.bad_messages} malformed messages; last: {e}")
                    return
                self.queue(protocol.Error(ErrorCode.BAD_MESSAGE, str(e)))  # the one non-fatal code, whatever the kind

    async def _dispatch(self, message: protocol.Message, session: StreamSession) -> None:
        if isinstance(message, Audio):
            pcm = self.wire.decode(message.payload)
            if self.paused:
                self.ignored_messages += 1
                return
            self.scheduler.join(session)
            if len(pcm):
                await session.input.put(pcm)  # waits while the jitter buffer is full
        elif isinstance(message, Control):
            self._control(message, session)
        elif isinstance(message, Handshake):
            raise ProtocolError("HANDSHAKE was already done for this session")
        else:  # TEXT, METADATA, ERROR from a client, and unknown kinds: ignored
            self.ignored_messages += 1

    def _control(self, message: Control, session: StreamSession) -> None:
        action, fields = message.action, message.fields
        if action == "ping":
            echo = {key: fields[key] for key in ("id", "t") if key in fields}
            self.queue(Control("pong", {**echo, "server_time": time.time()}))
        elif action == "start":
            self.paused = False
            self.scheduler.join(session)
        elif action == "stop":
            self.paused = True
            self.scheduler.leave(session)
            session.input.clear()
            # the model forgets the says with the row: their end is said here (and the frames still queued, or that the
            # row still makes, say nothing more of them)
            dropped = self.scheduler.drop_says(session)
            session.output.forget_says(dropped)
            for say_id in dropped:
                self.queue(Metadata({"type": "say", "id": say_id, "event": "dropped"}))
        elif action == "say":
            text, say_id = protocol.parse_say_control(fields)
            if not self.server.can_say():
                raise ProtocolError(CANNOT_SAY)
            if session.says_open >= protocol.MAX_OPEN_SAYS:
                raise ProtocolError(f"{session.says_open} says are not yet said (at most {protocol.MAX_OPEN_SAYS}): wait for their events")
            self.scheduler.say(session, text, say_id)
            self.queue(Metadata({"type": "say", "id": say_id, "event": "queued"}))
        elif action == "interrupt":
            reply = fields.get("reply", False)
            if not isinstance(reply, bool):
                raise ProtocolError("interrupt's 'reply' must be true or false")
            flushed = session.output.clear()
            stopped = reply and self.server.can_say()  # the model stops its reply too (a model with the answer assist)
            if stopped:
                for _, say_id in self.scheduler.hush(session):  # says the model never got: their end is said here
                    self.queue(Metadata({"type": "say", "id": say_id, "event": "dropped"}))
            self.queue(Metadata({"type": "interrupted", "flushed_frames": flushed, "reply": stopped}))
        elif action == "config":
            changes = protocol.parse_config_control(fields)
            if "voice" in changes:
                error = self.server.voice_error(changes["voice"])
                if error:
                    raise ProtocolError(error)
                self.scheduler.configure(session, {"voice": changes["voice"]})  # the session's next reply is said in it
            if "replies" in changes:
                if changes["replies"] == "client" and not self.server.can_say():
                    raise ProtocolError(CANNOT_SAY)
                self.scheduler.configure(session, {"replies": changes["replies"]})  # from the next question on
            if "check_rounds" in changes:
                self.scheduler.configure(session, {"check_rounds": changes["check_rounds"]})  # from the next question on
            self.session_config = dataclasses.replace(self.session_config, **changes)
            self.queue(Metadata({"type": "config", **changes}))
        # "pong": nothing to do

    # -- writer --------------------------------------------------------------------------

    async def _timer(self) -> None:
        """Idle timeout and METADATA pacing (wakes the writer when stats are due)."""
        while True:
            now = time.monotonic()
            if now - self.last_message >= self.config.idle_timeout:
                self.fail(ErrorCode.IDLE_TIMEOUT, f"no message for {self.config.idle_timeout:g} s", CLOSE_NORMAL)
                return
            if self.session_config.metadata_interval and now >= self.next_metadata:
                self._wake.set()
            await asyncio.sleep(min(0.1, self.last_message + self.config.idle_timeout - now + 1e-3))

    async def _write(self) -> None:
        session, wire = self.session, self.wire
        frame_seconds = session.frame_seconds
        self.next_metadata = time.monotonic() + self.session_config.metadata_interval
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.events:
                await self.ws.send(self.events.popleft())
            if self.closing.is_set():
                return
            while True:
                for index, event in session.output.take_kept_events():  # of frames dropped or flushed
                    for data in _frame_events({"events": [event]}, index * frame_seconds):
                        await self.ws.send(protocol.encode(Metadata(data)))
                if not len(session.output):
                    break
                frame = session.output.pop()
                payload = wire.encode(frame.pcm)
                if payload:
                    await self.ws.send(protocol.encode(Audio(payload)))
                if frame.text is not None and self.session_config.send_text:
                    for speaker, text in _text_pieces(frame.text):
                        start = frame.index * frame_seconds
                        await self.ws.send(protocol.encode(Text(text, start, start + frame_seconds, speaker)))
                for data in _frame_events(frame.text, frame.index * frame_seconds):  # the says' fate, the user's talking
                    await self.ws.send(protocol.encode(Metadata(data)))
                while self.events:  # pongs do not wait behind a backlog of audio
                    await self.ws.send(self.events.popleft())
            interval = self.session_config.metadata_interval
            if interval and time.monotonic() >= self.next_metadata:
                self.next_metadata = time.monotonic() + interval
                await self.ws.send(protocol.encode(Metadata(self._stats())))

    def _stats(self) -> dict[str, Any]:
        snapshot = self.scheduler.snapshot()
        return {
            "type": "stats",
            **self.session.stats(),
            "bad_messages": self.bad_messages,
            "ignored_messages": self.ignored_messages,
            "replies_dropped": self.events_dropped,
            "server_live_sessions": snapshot["live_sessions"],
            "server_batch": snapshot["batch_capacity"],
            "server_step_ms_p50": snapshot["step_ms_p50"],
            "server_late_ticks": snapshot["late_ticks"],
        }


def _frame_events(text: Any, time: float) -> list[dict[str, Any]]:
    """The METADATA a model's text piece carries in its ``"events"`` (see the assist): what became of says
    (``{"id": ..., "event": ...}`` -> ``{"type": "say", ...}``) and the user's talking (``{"user": "started"}`` ->
    ``{"type": "user", "event": "started", "time": ...}``, ``time`` the frame's, seconds since the session joined)."""
    events = text.get("events") if isinstance(text, dict) else None
    out = []
    for e in events or []:
        if isinstance(e, dict) and e.get("event") in protocol.SAY_EVENTS:
            out.append({"type": "say", "id": e.get("id"), "event": e["event"]})
        elif isinstance(e, dict) and e.get("user") in protocol.USER_EVENTS:
            out.append({"type": "user", "event": e["user"], "time": round(time, 3)})
    return out


def _text_pieces(text: Any) -> list[tuple[str, str]]:
    if isinstance(text, str):
        return [("model", text)] if text else []
    if isinstance(text, dict):
        return [(speaker, piece) for speaker, piece in text.items() if speaker in protocol.SPEAKERS and isinstance(piece, str) and piece]
    return []


# -- command line -------------------------------------------------------------------------


def model_dtype(name: str, device: str):
    """The LM compute dtype ``--dtype name`` means on ``device`` (:func:`speechlm.speech.resolve_dtype`)."""
    from ..speech import resolve_dtype

    return resolve_dtype(name, device)


def build_model(config: ServerConfig) -> DuplexModel:
    """The model named by ``config.model`` on ``config.device``."""
    import torch

    from .models import EchoCodecModel, LoopbackModel, SilenceModel, with_compiled_codec

    if config.threads:
        torch.set_num_threads(config.threads)
    if config.model == "silence":
        return SilenceModel()
    if config.model == "loopback":
        return LoopbackModel()
    if config.model in ("echo", "duplex"):
        from ..codec.model import Codec

        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            torch.device(device)
        except RuntimeError as e:
            raise SpeechLMError(f"bad --device {config.device!r}: {e}") from None
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SpeechLMError(f"--device {device} asked for CUDA, but this machine has none")
        dtype = model_dtype(config.dtype, device)
        if config.model == "duplex":
            from .duplex_model import build_duplex_model

            model = build_duplex_model(config.lm, config.codec, device=device, graphs=config.cuda_graphs, dtype=dtype,
                                       speech_detector=config.gate_detector if config.noise_gate else None,
                                       **({} if config.noise_gate else {"noise_gate": None}))  # fmt: skip
        else:
            model = EchoCodecModel(Codec.from_pretrained(config.codec, device=device))
        model = with_compiled_codec(model) if config.compile_codec else model
        if config.model == "duplex" and config.assist:
            from .assist import AssistConfig, build_assisted_model

            model = build_assisted_model(model, config.assist, dtype=dtype, config=AssistConfig(
                voice=config.assist_voice, tts_voice=config.voice, background=True, noise_gate=config.noise_gate,
                **({"asr_views": config.assist_views} if config.assist_views is not None else {}),
                **({"asr_check_rounds": config.assist_check_rounds} if config.assist_check_rounds is not None else {}),
                **({} if config.assist_speech_detector is None else
                   {"speech_detector": None if config.assist_speech_detector == "none" else config.assist_speech_detector})))
        return model
    raise SpeechLMError(f"unknown model {config.model!r} (known: duplex, echo, loopback, silence)")


async def run_server(config: ServerConfig, model: DuplexModel | None = None, on_ready: Callable[[DuplexServer], Any] | None = None) -> None:
    """Serve until SIGINT/SIGTERM (or cancellation); clients get ERROR shutting_down and a close frame.

    ``model``: None builds the one ``config`` names. ``on_ready(server)`` runs once it listens.
    """
    config.check()
    model = model if model is not None else build_model(config)
    server = DuplexServer(model, config)
    try:
        await server.start()
    except OSError as e:
        raise SpeechLMError(f"cannot listen on {config.host}:{config.port}: {e.strerror or e}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    print(
        f"speechlm serve: {type(model).__name__} at {server.url}  page: http://{server._display_host}:{server.port}/  (Ctrl-C stops)",
        flush=True,
    )
    if on_ready is not None:
        on_ready(server)
    try:
        await stop.wait()
    finally:
        await server.stop()
        close = getattr(model, "close", None)  # e.g. the answer assist's thread
        if callable(close):
            close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


def serve_main(args: argparse.Namespace) -> int:
    """``speechlm serve`` handler: raises SpeechLMError for bad input, returns 0 after Ctrl-C."""
    config = config_from_args(args)
    config.check()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)
    try:
        asyncio.run(run_server(config))
    except KeyboardInterrupt:  # before the signal handlers were in place (e.g. while loading the model)
        return 130
    return 0
