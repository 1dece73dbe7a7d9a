"""Python client for the duplex server: a library (:class:`DuplexClient`, :func:`stream_file`,
:func:`stream_microphone`) and the ``speechlm client`` command.

    async with await DuplexClient.connect("ws://127.0.0.1:8998") as client:
        await client.send_audio(pcm)                 # float32 16 kHz, any length
        async for message in client.messages():     # Audio (see client.pcm), Text, Control, Metadata, Error
            ...

Every failure a user can cause or meet (server down, refused, full, closed with an error)
raises :class:`ClientError` with a one-line message.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import logging
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from ..codec.errors import SpeechLMError
from . import protocol
from .catchup import CatchUp, rms
from .protocol import Audio, Control, Error, ErrorCode, Handshake, Metadata, Text

log = logging.getLogger(__name__)

CLIENT_NAME = "speechlm-client/1"


class ClientError(SpeechLMError):
    """The server could not be reached, refused us, or ended the session with an error."""


class ServerBusy(ClientError):
    """The server refused the session for now (ERROR server_full: all its sessions taken, or at its real-time
    capacity); it may take one later (``DuplexClient.connect(..., wait_seconds=...)`` tries again)."""


RETRY_SECONDS = 2.0  # between tries while a server is busy


def normalize_url(url: str) -> str:
    """``host:port``, ``http://...`` or ``ws://host:port`` -> ``ws://host:port/ws``."""
    if "://" not in url:
        url = "ws://" + url
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ClientError(f"not a websocket URL: {url!r} (expected ws://HOST:PORT)")
    path = parts.path if parts.path not in ("", "/") else "/ws"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


class DuplexClient:
    """One session with the server. Create with :meth:`connect`."""

    def __init__(self, ws: ClientConnection, server_config: dict[str, Any], codec: str):
        self.ws = ws
        self.server_config = server_config
        self.sample_rate = int(server_config.get("sample_rate", protocol.SAMPLE_RATE))
        self.frame_length = int(server_config.get("frame_length", protocol.FRAME_LENGTH))
        self.codec = codec
        self._send_wire = protocol.wire_codec(codec, self.sample_rate)
        self._receive_wire = protocol.wire_codec(codec, self.sample_rate) if codec == "opus" else self._send_wire
        self._pending = np.zeros(0, dtype=np.float32)  # opus: samples waiting for a whole frame
        self._ping_ids = itertools.count(1)
        self._pings: dict[int, float] = {}
        self.round_trips: list[float] = []  # seconds, one per answered ping
        self.fatal_error: Error | None = None

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        token: str | None = None,
        codec: str = "pcm16",
        client: str = CLIENT_NAME,
        open_timeout: float = 10.0,
        wait_seconds: float = 0.0,
        **options: Any,
    ) -> DuplexClient:
        """Open ``url``, send the HANDSHAKE, wait for the server's. ``options`` go into the handshake
        (``autostart``, ``send_text``, ``metadata_interval``, ``voice``, ``replies``, ``check_rounds``, ``catch_up``; None values
        are left out).
        ``wait_seconds``: while the server is busy (:class:`ServerBusy`), try again every ``RETRY_SECONDS`` for up to
        this long before giving up (0: at once)."""
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                return await cls._connect_once(url, token=token, codec=codec, client=client, open_timeout=open_timeout, **options)
            except ServerBusy:
                if time.monotonic() + RETRY_SECONDS > deadline:
                    raise
            await asyncio.sleep(RETRY_SECONDS)

    @classmethod
    async def _connect_once(cls, url: str, *, token: str | None, codec: str, client: str, open_timeout: float, **options: Any) -> DuplexClient:
        url = normalize_url(url)
        if codec == "opus" and not protocol.opus_available():
            raise ClientError("--codec opus needs libopus (Debian: libopus0) or the sphn package (pip install sphn)")
        try:
            ws = await connect(url, open_timeout=open_timeout, max_size=2**20, compression=None, close_timeout=2, proxy=None)
        except InvalidStatus as e:
            body = (e.response.body or b"").decode("utf-8", "replace").strip()
            raise ClientError(f"server at {url} refused the connection: HTTP {e.response.status_code} {body}".strip()) from None
        except InvalidURI:
            raise ClientError(f"not a websocket URL: {url!r}") from None
        except (asyncio.TimeoutError, TimeoutError):
            raise ClientError(f"timed out connecting to {url} after {open_timeout:g} s") from None
        except (OSError, InvalidHandshake) as e:
            reason = (
                "connection refused"
                if isinstance(e, ConnectionRefusedError)
                else getattr(e, "strerror", None) or str(e) or type(e).__name__
            )
            raise ClientError(f"cannot connect to {url}: {reason} (is `speechlm serve` running there?)") from None
        config = {"version": protocol.VERSION, "sample_rate": protocol.SAMPLE_RATE, "codec": codec, "client": client,
                  **{k: v for k, v in options.items() if v is not None}}  # fmt: skip
        if token:
            config["token"] = token
        with contextlib.suppress(ConnectionClosed):  # a server that is full answers before reading: read that below
            await ws.send(protocol.encode(Handshake(config)))
        try:
            reply = protocol.decode(await asyncio.wait_for(ws.recv(), open_timeout), max_bytes=2**20)
        except (asyncio.TimeoutError, TimeoutError):
            await ws.close()
            raise ClientError(f"{url} did not answer the handshake within {open_timeout:g} s") from None
        except ConnectionClosed as e:
            raise ClientError(f"server closed the connection during the handshake: {_describe_close(e)}") from None
        except protocol.ProtocolError as e:
            await ws.close()
            raise ClientError(f"server sent a malformed handshake: {e}") from None
        if isinstance(reply, Error):
            await ws.close()
            refused = ServerBusy if reply.code == protocol.ErrorCode.SERVER_FULL else ClientError
            raise refused(f"server refused the session ({reply.code}): {reply.message}")
        if not isinstance(reply, Handshake):
            await ws.close()
            raise ClientError(f"server answered the handshake with {type(reply).__name__}, not HANDSHAKE")
        return cls(ws, reply.config, codec)

    async def __aenter__(self) -> DuplexClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.ws.close()

    # -- sending -------------------------------------------------------------------------

    async def send_audio(self, pcm: np.ndarray) -> None:
        """Send float32 samples (any length) at the server's rate, one AUDIO message per frame."""
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if self.codec == "opus":  # Opus takes whole frames only
            pcm = np.concatenate([self._pending, pcm])
            whole = len(pcm) // self.frame_length * self.frame_length
            pcm, self._pending = pcm[:whole], pcm[whole:]
        for start in range(0, len(pcm), self.frame_length):
            payload = self._send_wire.encode(pcm[start : start + self.frame_length])
            if payload:
                await self.ws.send(protocol.encode(Audio(payload)))

    async def send_control(self, action: str, **fields: Any) -> None:
        await self.ws.send(protocol.encode(Control(action, fields)))

    async def set_voice(self, voice: str) -> None:
        """Say the model's next replies in ``voice`` (one of the handshake reply's ``voices``; CONTROL ``config``:
        the server acknowledges with METADATA ``{"type": "config", "voice": ...}`` or answers ERROR ``bad_message``)."""
        await self.send_control("config", voice=voice)

    async def say(self, text: str, say_id: Any = None) -> None:
        """Have the model say ``text`` in this session's voice at its next turn (CONTROL ``say``; the server needs its
        answer assist): once the user is quiet, after what it is saying; a text sent while the session's says are being
        said follows them in the same turn. METADATA ``{"type": "say", "id": say_id, "event": ...}`` says what became
        of it: ``queued``, ``started``, ``done``, ``interrupted`` (the user talked over it) or ``dropped``."""
        await self.send_control("say", text=text, **({} if say_id is None else {"id": say_id}))

    async def interrupt(self, reply: bool = False) -> None:
        """Drop the model audio queued for this session (CONTROL ``interrupt``); ``reply``: the model also stops what it
        is saying, a reply planned and the says waiting (a server with the answer assist)."""
        await self.send_control("interrupt", **({"reply": True} if reply else {}))

    async def ping(self) -> None:
        """Send a ping; its round trip lands in :attr:`round_trips` when the pong comes back."""
        ping_id = next(self._ping_ids)
        self._pings[ping_id] = time.perf_counter()
        if len(self._pings) > 100:
            self._pings.pop(next(iter(self._pings)))
        await self.send_control("ping", id=ping_id, t=time.time())

    # -- receiving -----------------------------------------------------------------------

    def pcm(self, message: Audio) -> np.ndarray:
        """The float32 samples of a received AUDIO message."""
        return self._receive_wire.decode(message.payload)

    async def messages(self) -> AsyncIterator[protocol.Message]:
        """Decoded server messages until the session ends. Pongs are consumed (see round_trips).

        Raises ClientError when the server ends the session with an error.
        """
        while True:
            try:
                data = await self.ws.recv()
            except ConnectionClosed as e:
                if self.fatal_error is not None:
                    raise ClientError(f"server ended the session ({self.fatal_error.code}): {self.fatal_error.message}") from None
                if e.rcvd is None:
                    if e.sent is not None:
                        return  # we closed
                    raise ClientError("connection to the server was lost (no close frame)") from None
                if e.rcvd.code == 1000:
                    return
                raise ClientError(f"server closed the connection: {_describe_close(e)}") from None
            try:
                message = protocol.decode(data, max_bytes=2**20)
            except protocol.ProtocolError:
                continue  # a newer server's extension we cannot read: ignore
            if isinstance(message, Control) and message.action == "pong":
                sent = self._pings.pop(message.fields.get("id"), None)
                if sent is not None:
                    self.round_trips.append(time.perf_counter() - sent)
                continue
            if isinstance(message, Error) and message.code != ErrorCode.BAD_MESSAGE:
                self.fatal_error = message
            yield message


def _describe_close(e: ConnectionClosed) -> str:
    if e.rcvd is None:
        return "no close frame (connection dropped)"
    return f"code {e.rcvd.code}" + (f", {e.rcvd.reason}" if e.rcvd.reason else "")


# -- conversations ------------------------------------------------------------------------


@dataclass
class Conversation:
    """What came back from one session."""

    audio: np.ndarray  # model audio, float32 at sample_rate
    sample_rate: int
    texts: list[Text] = field(default_factory=list)
    errors: list[Error] = field(default_factory=list)  # non-fatal ERRORs (bad_message)
    stats: dict[str, Any] = field(default_factory=dict)  # the server's last METADATA stats
    server: dict[str, Any] = field(default_factory=dict)  # the server's HANDSHAKE
    round_trips: list[float] = field(default_factory=list)  # ping round trips, seconds
    says: list[dict[str, Any]] = field(default_factory=list)  # the server's say events ({"id", "event"}), in order
    user_events: list[dict[str, Any]] = field(default_factory=list)  # the user's talking: {"event": "started"/"stopped", "time"}
    complete: bool = True  # False when the reply stopped short of the audio sent (timed out)

    def transcript(self, speaker: str) -> str:
        # TEXT pieces carry their own leading space when they start a word (docs/protocol.md): concatenate.
        return "".join(t.text for t in self.texts if t.speaker == speaker).strip()

    def take(self, message, client: DuplexClient, on_text: Callable[[Text], Any] | None = None) -> np.ndarray | None:
        """Record one server message; returns the PCM of an AUDIO message (None for the other kinds)."""
        if isinstance(message, Audio):
            return client.pcm(message)
        if isinstance(message, Text):
            self.texts.append(message)
            if on_text is not None:
                on_text(message)
        elif isinstance(message, Metadata) and message.data.get("type") == "stats":
            self.stats = message.data
        elif isinstance(message, Metadata) and message.data.get("type") == "say":
            self.says.append({"id": message.data.get("id"), "event": message.data.get("event")})
        elif isinstance(message, Metadata) and message.data.get("type") == "user":
            self.user_events.append({"event": message.data.get("event"), "time": message.data.get("time")})
        elif isinstance(message, Error):
            self.errors.append(message)
        return None


Reply = Callable[[str], "str | Iterable[str] | None"]  # a question's transcript -> the reply, whole or in parts


class ClientReplies:
    """The client's side of ``replies: client``: each question's transcript (the user's TEXT) goes to ``reply`` in a
    worker thread (it may take its time: an LLM's call), and what it returns, unless None or blank, is said (CONTROL
    ``say``); a reply that is an iterable of texts (a generator: an LLM's reply streamed sentence by sentence) has each
    said as it comes, the model speaking the first while the next are written. ``reply=None``: nothing is answered
    (the server's model writes the replies).

    A new question supersedes the reply to the one before: that reply's parts not yet said are not sent, and if some
    of its says are still waiting at the server (not yet ``done``, ``interrupted`` or ``dropped``), CONTROL
    ``interrupt`` with ``"reply": true`` drops them before the new reply is said."""

    def __init__(self, client: DuplexClient, reply: Reply | None):
        self.client, self.reply = client, reply
        self._tasks: set[asyncio.Task] = set()
        self._turn = 0  # the questions so far: a reply goes on only while its question is the last
        self._open: set[str] = set()  # the ids of this object's says whose end has not come

    @staticmethod
    def options(reply: Reply | None) -> dict[str, str]:
        """The HANDSHAKE options for ``reply``."""
        return {"replies": "client"} if reply is not None else {}

    def take(self, message: protocol.Message) -> None:
        if isinstance(message, Metadata) and message.data.get("type") == "say" and message.data.get("event") in protocol.SAY_ENDS:
            self._open.discard(message.data.get("id"))
        if self.reply is not None and isinstance(message, Text) and message.speaker == "user" and message.text.strip():
            self._turn += 1
            task = asyncio.create_task(self._answer(message.text.strip(), self._turn, stale=bool(self._open)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, question: str, turn: int, stale: bool = False) -> None:
        if stale:  # the reply before is still to be said (or being said): not now
            self._open.clear()
            await self.client.interrupt(reply=True)
        loop = asyncio.get_running_loop()
        parts: asyncio.Queue[str | None] = asyncio.Queue()

        def put(part: str | None) -> None:
            with contextlib.suppress(RuntimeError):  # the session ended (its loop closed) while the reply was written
                loop.call_soon_threadsafe(parts.put_nowait, part)

        def write() -> None:  # the worker thread: the reply, part by part as it comes
            try:
                reply = self.reply(question)
                for part in [reply] if reply is None or isinstance(reply, str) else reply:
                    if part and part.strip():
                        put(part.strip())
            except Exception as e:  # noqa: BLE001 - the reply function's failure costs that reply, not the session
                log.warning("the reply to %r failed: %s", question[:80], e)
            finally:
                put(None)

        writer = asyncio.ensure_future(asyncio.to_thread(write))
        try:
            said = 0
            while (part := await parts.get()) is not None:
                if turn != self._turn:
                    continue  # superseded by a newer question: the rest of this reply is not said
                said += 1
                say_id = f"reply-{turn}-{said}"
                self._open.add(say_id)
                await self.client.say(part, say_id=say_id)
        finally:
            await asyncio.gather(writer, return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def stream_file(
    url: str,
    audio: np.ndarray,
    *,
    token: str | None = None,
    realtime: bool = True,
    listen_seconds: float = 2.0,
    codec: str = "pcm16",
    on_text: Callable[[Text], None] | None = None,
    grace_seconds: float = 5.0,
    voice: str | None = None,
    wait_seconds: float = 0.0,
    says: Sequence[str] = (),
    reply: Reply | None = None,
    check_rounds: int | None = None,
) -> Conversation:
    """Stream ``audio`` (float32, 16 kHz) like a microphone would, then ``listen_seconds`` of silence,
    and collect the model's reply until as much audio came back as went out.

    ``realtime=False`` sends as fast as the server accepts (its jitter buffer paces us). ``voice``: the server's
    voice to reply in (its HANDSHAKE reply lists them). ``wait_seconds``: see :meth:`DuplexClient.connect`.
    ``says``: texts the model says first (CONTROL ``say``, sent before the audio). ``reply``: the client writes the
    replies (:class:`ClientReplies`). ``check_rounds``: the server checks each question's transcript this many rounds.
    """
    options = {**ClientReplies.options(reply), "check_rounds": check_rounds}
    if not realtime:
        options["catch_up"] = False  # sent ahead of time on purpose: the server must not skip any of it
    async with await DuplexClient.connect(url, token=token, codec=codec, voice=voice, wait_seconds=wait_seconds, **options) as client:
        frame = client.frame_length
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        listen = np.zeros(round(listen_seconds * client.sample_rate), dtype=np.float32)
        outgoing = np.concatenate([audio, listen])
        outgoing = np.pad(outgoing, (0, -len(outgoing) % frame))
        target = len(outgoing) - (2 * frame if codec == "opus" else 0)  # Opus keeps a little in its pipeline
        result = Conversation(np.zeros(0, np.float32), client.sample_rate, server=client.server_config)
        received: list[np.ndarray] = []
        got = 0
        replies = ClientReplies(client, reply)
        for text in says:
            await client.say(text)

        async def send() -> None:
            start = time.perf_counter()
            frame_seconds = frame / client.sample_rate
            for i in range(len(outgoing) // frame):
                if realtime:
                    delay = start + i * frame_seconds - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                if i % 25 == 0:
                    await client.ping()
                await client.send_audio(outgoing[i * frame : (i + 1) * frame])

        async def receive() -> None:
            nonlocal got
            async for message in client.messages():
                pcm = result.take(message, client, on_text)
                replies.take(message)
                if pcm is not None:
                    received.append(pcm)
                    got += len(pcm)
                    if got >= target:
                        return
            raise ClientError(f"server closed the session after {got / client.sample_rate:.2f} s of reply")

        sender = asyncio.create_task(send())
        receiver = asyncio.create_task(receive())
        deadline = len(outgoing) / client.sample_rate + grace_seconds
        try:
            done, _ = await asyncio.wait({receiver}, timeout=deadline)
            if sender.done() and sender.exception() is not None and not receiver.done():
                raise ClientError(f"sending failed: {sender.exception()}")
            if receiver in done:
                receiver.result()  # raises ClientError if the server ended the session
            else:
                result.complete = False
        finally:
            for task in (sender, receiver):
                task.cancel()
            await asyncio.gather(sender, receiver, return_exceptions=True)
            await replies.close()
        result.audio = np.concatenate(received) if received else np.zeros(0, np.float32)
        result.round_trips = list(client.round_trips)
        return result


class PlaybackBuffer:
    """Thread-safe jitter buffer between network frames and a sound card callback.

    Playback starts once ``prebuffer`` samples are queued; on underrun it plays silence
    and waits for ``prebuffer`` again; beyond ``max_samples`` the oldest samples go. With ``catch_up``
    (the default) a backlog beyond the prebuffer that lasts a second — the model's audio
    held back by a network stall, then delivered at once — is drained by dropping quiet frames as they come
    (:class:`~speechlm.streaming.catchup.CatchUp`), so that the stall's delay does not stay.
    """

    def __init__(self, prebuffer: int = 1280, max_samples: int = 16_000, catch_up: bool = True, frame_length: int = 640):
        self.prebuffer, self.max_samples, self.frame_length = prebuffer, max_samples, frame_length
        self._chunks: collections.deque[np.ndarray] = collections.deque()
        self._size = 0
        self._playing = False
        self._lock = threading.Lock()
        self._drain = CatchUp(cushion=-(-prebuffer // frame_length)) if catch_up else None  # drained to the prebuffer
        self.underruns = 0
        self.dropped = 0

    def __len__(self) -> int:
        return self._size

    @property
    def skipped(self) -> int:
        """Quiet frames dropped to drain a backlog."""
        return self._drain.skipped if self._drain is not None else 0

    def push(self, pcm: np.ndarray) -> None:
        with self._lock:
            if self._playing and self._drain is not None and self._drain.skip(rms(pcm), self._size // self.frame_length):
                return
            self._chunks.append(np.asarray(pcm, dtype=np.float32))
            self._size += len(pcm)
            while self._size > self.max_samples:
                self._size -= len(old := self._chunks.popleft())
                self.dropped += len(old)

    def clear(self) -> None:
        with self._lock:
            self._chunks.clear()
            self._size = 0
            self._playing = False

    def pull(self, n: int) -> np.ndarray:
        out = np.zeros(n, dtype=np.float32)
        with self._lock:
            if not self._playing:
                if self._size < self.prebuffer:
                    return out
                self._playing = True
            filled = 0
            while filled < n and self._chunks:
                chunk = self._chunks[0]
                take = min(n - filled, len(chunk))
                out[filled : filled + take] = chunk[:take]
                filled += take
                if take == len(chunk):
                    self._chunks.popleft()
                else:
                    self._chunks[0] = chunk[take:]
            self._size -= filled
            if filled < n:
                self.underruns += 1
                self._playing = False
                if self._drain is not None:
                    self._drain.underrun()
        return out


def import_sounddevice():
    """sounddevice, or a ClientError that says what to install."""
    try:
        import sounddevice
    except (ImportError, OSError) as e:  # OSError: the module is there but PortAudio is not
        raise ClientError(
            f"--mic needs the sounddevice package and the PortAudio library (pip install sounddevice; apt install libportaudio2): {e}"
        ) from None
    return sounddevice


def echo_canceller(echo_cancel: bool | None, sample_rate: int):
    """``stream_microphone``'s echo canceller: None when off (``echo_cancel`` False) or, unless required (True), when
    it cannot be made (a warning)."""
    if echo_cancel is False:
        return None
    from .echo import EchoCanceller

    try:
        return EchoCanceller(sample_rate)
    except ClientError as e:
        if echo_cancel:
            raise
        log.warning("no echo cancellation (%s): the model will hear itself through speakers", e)
        return None


async def stream_microphone(
    url: str, *, token: str | None = None, seconds: float | None = None, codec: str = "pcm16", on_text: Callable[[Text], None] | None = None,
    voice: str | None = None, wait_seconds: float = 0.0, echo_cancel: bool | None = None, says: Sequence[str] = (),
    reply: Reply | None = None, check_rounds: int | None = None,
) -> Conversation:
    """Full duplex with the sound card: microphone to the server, the server to the speakers.

    Runs for ``seconds`` (None: until cancelled, e.g. Ctrl-C). Returns the model audio heard. ``echo_cancel``: clean
    the speakers' sound out of the microphone's (:class:`speechlm.streaming.echo.EchoCanceller`; True = required,
    None = when the ``livekit`` package is there, else a warning: use headphones; False = off). ``says``, ``reply``,
    ``check_rounds``: as for :func:`stream_file`.
    """
    sd = import_sounddevice()
    loop = asyncio.get_running_loop()
    options = {**ClientReplies.options(reply), "check_rounds": check_rounds}
    async with await DuplexClient.connect(url, token=token, codec=codec, voice=voice, wait_seconds=wait_seconds, **options) as client:
        rate, frame = client.sample_rate, client.frame_length
        canceller = echo_canceller(echo_cancel, rate)
        captured: asyncio.Queue[np.ndarray] = asyncio.Queue(maxsize=50)
        playback = PlaybackBuffer(prebuffer=2 * frame, max_samples=rate, frame_length=frame)
        result = Conversation(np.zeros(0, np.float32), rate, server=client.server_config)
        received: list[np.ndarray] = []
        replies = ClientReplies(client, reply)
        for text in says:
            await client.say(text)

        def on_capture(indata, frames, time_info, status) -> None:  # sound card thread
            chunk = indata[:, 0].copy() if canceller is None else canceller.clean(indata[:, 0])
            loop.call_soon_threadsafe(lambda: captured.full() or captured.put_nowait(chunk))

        def on_playback(outdata, frames, time_info, status) -> None:  # sound card thread
            outdata[:, 0] = playback.pull(frames)
            if canceller is not None:
                canceller.played(outdata[:, 0])

        async def send() -> None:
            for i in itertools.count():
                await client.send_audio(await captured.get())
                if i % 25 == 0:
                    await client.ping()

        async def receive() -> None:
            async for message in client.messages():
                pcm = result.take(message, client, on_text)
                replies.take(message)
                if pcm is not None:
                    playback.push(pcm)
                    received.append(pcm)

        with (
            sd.InputStream(samplerate=rate, channels=1, dtype="float32", blocksize=frame, callback=on_capture) as mic,
            sd.OutputStream(samplerate=rate, channels=1, dtype="float32", blocksize=frame, callback=on_playback) as speakers,
        ):
            if canceller is not None:
                canceller.set_delay_ms(1000 * (getattr(mic, "latency", 0.0) + getattr(speakers, "latency", 0.0)))
            tasks = [asyncio.create_task(send()), asyncio.create_task(receive())]
            try:
                done, _ = await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    task.result()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await replies.close()
        result.audio = np.concatenate(received) if received else np.zeros(0, np.float32)
        result.round_trips = list(client.round_trips)
        return result


# -- command line -------------------------------------------------------------------------


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``speechlm client``; the handler is :func:`client_main`."""
    parser.add_argument("url", help="server address, e.g. ws://127.0.0.1:8998 (the /ws path is added)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--input", "-i", help="audio file to speak to the server (any format soundfile reads; resampled to 16 kHz)")
    source.add_argument("--mic", action="store_true", help="talk through the sound card (needs sounddevice)")
    parser.add_argument("-o", "--output", help="write the model's audio here (.wav, .flac, .ogg, .opus or .mp3)")
    parser.add_argument("--fast", action="store_true", help="send the file as fast as the server accepts instead of in real time")
    parser.add_argument("--listen-seconds", type=float, default=2.0, help="keep listening this long after the input ends (default 2)")
    parser.add_argument("--seconds", type=float, help="with --mic: stop after this long (default: until Ctrl-C)")
    parser.add_argument("--no-echo-cancel", dest="echo_cancel", action="store_false", default=None,
                        help="with --mic: leave the speakers' sound in the microphone's (headphones); by default WebRTC's echo "
                             "canceller cleans it out when the livekit package is there (pip install 'speechlm[mic]')")
    parser.add_argument("--token", help="the server's token, if it has one")
    parser.add_argument("--voice", help="the voice the server replies in, one of those its handshake lists (default: the server's)")
    parser.add_argument("--codec", choices=protocol.CODECS, default="pcm16", help="audio on the wire (default pcm16; opus: libopus, or sphn without it)")
    parser.add_argument("--json", action="store_true", help="print transcripts and stats as one JSON object")
    parser.add_argument("--say", action="append", default=[], metavar="TEXT",
                        help="have the model say TEXT first, e.g. a greeting (repeatable: said one after another; needs the server's answer assist)")
    parser.add_argument("--reply-command", metavar="CMD",
                        help="write the replies here instead of the server's model: each question's transcript goes to CMD's standard input "
                             "and what CMD prints is said, line by line as it prints (e.g. a script that streams your own LLM's reply); "
                             "needs the server's answer assist")
    parser.add_argument("--check-rounds", type=int, metavar="N",
                        help="the server checks each question's transcript against its sounds N rounds (0-5; default: the server's): "
                             "more often exactly right, later (for --reply-command)")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="while the server is busy (server_full), try again every 2 s for up to this long (default 0: give up at once)")


REPLY_COMMAND_SECONDS = 60.0


def command_reply(command: str) -> Reply:
    """``--reply-command CMD``: a reply function that runs CMD (split as a shell would, not run by one) with the
    question's transcript on its standard input, and yields each line it prints as the line comes (a command that
    streams an LLM's reply line by line is heard while it writes). A command that fails says what it printed before
    (a warning); one that runs past ``REPLY_COMMAND_SECONDS`` is stopped; one that cannot start is an error now."""
    argv = shlex.split(command)
    if not argv or shutil.which(argv[0]) is None:
        raise ClientError(f"--reply-command: cannot run {command!r} (no such program)")

    def reply(question: str) -> Iterator[str]:
        try:
            process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        except OSError as e:
            log.warning("--reply-command failed: %s", e)
            return
        timer = threading.Timer(REPLY_COMMAND_SECONDS, process.kill)
        timer.start()
        try:
            with contextlib.suppress(BrokenPipeError):  # a command that does not read its input
                process.stdin.write(question)
                process.stdin.close()
            yield from process.stdout  # line by line, as the command flushes them
            code = process.wait()
        finally:
            timer.cancel()
            if process.poll() is None:
                process.kill()
                process.wait()
        if code != 0:
            log.warning("--reply-command exited with %d: %s", code, process.stderr.read().strip()[-200:])

    return reply


def client_main(args: argparse.Namespace) -> int:
    """``speechlm client`` handler. Raises SpeechLMError (ClientError, AudioError) for the CLI to print."""
    from ..codec.audio import load_audio, save_audio

    if not args.input and not args.mic:
        raise ClientError("give --input FILE (or --mic to talk live)")
    if args.listen_seconds < 0:
        raise ClientError(f"--listen-seconds must be >= 0, got {args.listen_seconds}")
    if args.wait < 0:
        raise ClientError(f"--wait must be >= 0, got {args.wait}")
    normalize_url(args.url)  # fail early on a bad URL
    if args.output:
        from ..codec.audio import WRITE_FORMATS

        if not any(args.output.lower().endswith(suffix) for suffix in WRITE_FORMATS):
            raise ClientError(f"cannot write {args.output}: use one of {', '.join(WRITE_FORMATS)}")

    def show(text: Text) -> None:
        if not args.json:
            print(f"[{text.start:7.2f}s] {text.speaker}: {text.text}", flush=True)

    reply = command_reply(args.reply_command) if args.reply_command else None
    extra = {"says": args.say, "reply": reply, "check_rounds": args.check_rounds}

    sent_seconds = None
    if args.mic:
        try:
            result = asyncio.run(stream_microphone(args.url, token=args.token, seconds=args.seconds, codec=args.codec, on_text=show, voice=args.voice,
                                                   wait_seconds=args.wait, echo_cancel=args.echo_cancel, **extra))
        except KeyboardInterrupt:
            return 0
    else:
        audio = load_audio(args.input, sample_rate=protocol.SAMPLE_RATE)
        sent_seconds = len(audio) / protocol.SAMPLE_RATE + args.listen_seconds
        result = asyncio.run(
            stream_file(
                args.url,
                audio,
                token=args.token,
                realtime=not args.fast,
                listen_seconds=args.listen_seconds,
                codec=args.codec,
                on_text=show,
                voice=args.voice,
                wait_seconds=args.wait,
                **extra,
            )
        )
    if args.output:
        save_audio(args.output, result.audio, result.sample_rate)
    rtt_ms = 1000 * float(np.median(result.round_trips)) if result.round_trips else None
    summary = {
        "user": result.transcript("user"),
        "model": result.transcript("model"),
        "reply_seconds": round(len(result.audio) / result.sample_rate, 3),
        "output": args.output,
        "round_trip_ms": None if rtt_ms is None else round(rtt_ms, 2),
        "dropped_frames": result.stats.get("dropped_frames"),
        "underruns": result.stats.get("underruns"),
        "input_skipped": result.stats.get("input_skipped"),  # quiet frames the server skipped to drain a backlog
        "errors": [f"{e.code}: {e.message}" for e in result.errors],
        "says": result.says,
        "user_events": result.user_events,
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"user:  {summary['user'] or '(no text)'}")
    print(f"model: {summary['model'] or '(no text)'}")
    where = f" -> {args.output}" if args.output else ""
    rtt = f", ping round trip {summary['round_trip_ms']} ms" if rtt_ms is not None else ""
    print(f"{summary['reply_seconds']:.2f} s of model audio{where}{rtt}")
    if not result.complete:
        print(f"warning: the reply stopped short of the {sent_seconds:.2f} s sent (server too slow?)")
    for error in result.errors:
        print(f"warning: server said {error.code}: {error.message}")
    return 0
