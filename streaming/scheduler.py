"""The frame clock and the one scheduler that batches every live session into one model step.

    clock tick n (every frame_length / sample_rate s, absolute deadlines: no drift)
      ├─ apply joins / leaves (free-row pool; the batch grows by doubling, shrinks by halves)
      ├─ one frame of user pcm per live row from its jitter buffer (silence on underrun)
      ├─ model.step(user_pcm (B, L), state) in a worker thread (the event loop keeps serving)
      └─ each row's output frame (+ text) into its session's bounded outbound queue

Nothing here knows about sockets or the wire format: the server feeds
:class:`StreamSession.input` and drains :class:`StreamSession.output`.

Memory per session is bounded on both sides:

* input: :class:`InputBuffer` holds at most ``input_seconds`` of pcm; a producer
  that is ahead waits (:meth:`InputBuffer.put` blocks), so a fast client is paced
  by TCP back-pressure instead of growing the buffer. Audio that arrives after its
  tick is kept (the model hears silence for that tick, then the audio a frame late),
  so a network stall leaves a backlog: with ``catch_up`` (the default) a backlog that
  lasts (more than ``CATCH_UP_FRAMES`` frames through a whole second) is drained by
  skipping quiet frames, one a tick (``catchup.CatchUp``), so that the delay a stall
  added does not stay;
* output: :class:`OutputQueue` holds at most ``output_seconds`` of frames; when a
  reader is slower than real time the **oldest** frames are dropped and counted
  (late audio is worthless in a conversation; the newest is what the user should hear).
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .catchup import CatchUp, rms
from .models import DuplexModel, TextPiece, grow_state, shrink_state
from .protocol import SAY_ENDS
from .window import TimedWindow

log = logging.getLogger(__name__)



class InputBuffer:
    """Bounded FIFO of user pcm (float32 samples) with an async wait for room."""

    def __init__(self, capacity_samples: int):
        self.capacity = int(capacity_samples)
        self._data = np.zeros(self.capacity, dtype=np.float32)
        self._start = 0  # ring buffer: valid samples are _data[_start : _start + _size] (mod capacity)
        self._size = 0
        self._room = asyncio.Event()
        self._room.set()

    def __len__(self) -> int:
        return self._size

    def free(self) -> int:
        return self.capacity - self._size

    def _write(self, samples: np.ndarray) -> None:
        end = (self._start + self._size) % self.capacity
        first = min(len(samples), self.capacity - end)
        self._data[end : end + first] = samples[:first]
        self._data[: len(samples) - first] = samples[first:]
        self._size += len(samples)

    async def put(self, samples: np.ndarray) -> None:
        """Append ``samples`` (1-D float32), waiting while the buffer is full (back-pressure)."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        offset = 0
        while offset < len(samples):
            if self.free() == 0:
                self._room.clear()
                await self._room.wait()
                continue
            n = min(self.free(), len(samples) - offset)
            self._write(samples[offset : offset + n])
            offset += n

    def read(self, n: int) -> np.ndarray | None:
        """The next ``n`` samples, or ``None`` (and nothing consumed) when fewer are buffered."""
        if self._size < n:
            return None
        index = (self._start + np.arange(n)) % self.capacity
        out = self._data[index]
        self._start = (self._start + n) % self.capacity
        self._size -= n
        self._room.set()
        return out

    def clear(self) -> None:
        self._start = self._size = 0
        self._room.set()


@dataclass
class OutputFrame:
    index: int  # frame number since the session joined the batch (its time = index * frame seconds)
    pcm: np.ndarray  # (frame_length,) float32
    text: TextPiece


class OutputQueue:
    """Bounded FIFO of output frames; when full the oldest frame is dropped and counted.

    A frame's events (its text piece's ``"events"``: what became of says, the user's talking) outlive the frame: those
    of frames dropped or cleared are kept, in order, for :meth:`take_kept_events` (they are older than every frame still
    queued), so that a client always hears how each of its says ended, however slowly it reads (up to
    ``MAX_KEPT_EVENTS``: a client that reads nothing while it asks for says without end cannot grow them without bound;
    past that the oldest go)."""

    MAX_KEPT_EVENTS = 1024

    def __init__(self, capacity_frames: int):
        self.capacity = max(1, int(capacity_frames))
        self._frames: collections.deque[OutputFrame] = collections.deque()
        self._kept_events: list[tuple[int, dict]] = []
        self.dropped = 0
        self.ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._frames)

    def push(self, frame: OutputFrame) -> None:
        if len(self._frames) >= self.capacity:
            self._keep_events(self._frames.popleft())
            self.dropped += 1
        self._frames.append(frame)
        self.ready.set()

    def pop(self) -> OutputFrame:
        """The oldest queued frame (IndexError when empty)."""
        return self._frames.popleft()

    def clear(self) -> int:
        """Drop everything queued (an interrupt); returns how many frames went."""
        n = len(self._frames)
        for frame in self._frames:
            self._keep_events(frame)
        self._frames.clear()
        return n

    def take_kept_events(self) -> list[tuple[int, dict]]:
        """The events of the frames dropped or cleared since the last call, oldest first, with their frames' index."""
        events, self._kept_events = self._kept_events, []
        return events

    def forget_says(self, ids: list[Any]) -> None:
        """Take the events of the says ``ids`` out of the queued frames (the says were dropped: a CONTROL stop)."""
        if not ids:
            return
        for frame in self._frames:
            events = frame.text.get("events") if isinstance(frame.text, dict) else None
            if events:
                kept = [e for e in events if not (isinstance(e, dict) and e.get("id") in ids and e.get("event") not in SAY_ENDS)]
                frame.text = {**frame.text, "events": kept}

    def _keep_events(self, frame: OutputFrame) -> None:
        events = frame.text.get("events") if isinstance(frame.text, dict) else None
        if events:
            self._kept_events.extend((frame.index, e) for e in events if isinstance(e, dict))
            del self._kept_events[: -self.MAX_KEPT_EVENTS]


class StreamSession:
    """One user's place in the scheduler: jitter buffer in, bounded queue out, counters."""

    _ids = itertools.count(1)
    CATCH_UP_FRAMES = 1  # a lasting input backlog is drained to this many frames (40 ms of cushion)

    def __init__(self, frame_length: int, sample_rate: int, input_seconds: float = 2.0, output_seconds: float = 2.0):
        self.id = next(self._ids)
        self.frame_length = frame_length
        self.sample_rate = sample_rate
        self.input = InputBuffer(max(frame_length, round(input_seconds * sample_rate)))
        self.output = OutputQueue(round(output_seconds * sample_rate / frame_length))
        self.row: int | None = None  # batch row while live
        self.live = False  # in the batch (or about to join)
        self.frames = 0  # frames stepped since joining
        self.underruns = 0  # frames fed as silence because the user's audio had not arrived
        self.heard_audio = False  # underruns count only once the user has sent something
        self.generation = 0  # bumped at every join: output of a step from before a re-join is stale
        self.closed = False
        self.options: dict[str, Any] = {}  # the session's settings for its row of the model (e.g. "voice"), set at every join
        self.says: list[tuple[str, Any]] = []  # texts for the model to say, (text, id), handed to it at the next tick in the batch
        self.says_handed: list[Any] = []  # the ids of says handed to the model whose end (done, interrupted, dropped) it has not reported
        self.catch_up = True  # drain a lasting input backlog in quiet frames (HANDSHAKE "catch_up")
        self._drain = CatchUp(cushion=self.CATCH_UP_FRAMES)

    def next_frame(self) -> np.ndarray | None:
        """The user's next frame for this tick (None: it has not arrived). With ``catch_up``, a quiet frame is skipped
        (the one after it taken) while a backlog of more than CATCH_UP_FRAMES has lasted a second
        (:class:`~speechlm.streaming.catchup.CatchUp`): a stall's backlog drains in the user's pauses."""
        frame = self.input.read(self.frame_length)
        if frame is None:
            self._drain.underrun()
            return None
        if self.catch_up and self._drain.skip(rms(frame), len(self.input) // self.frame_length):
            return self.input.read(self.frame_length)
        return frame

    @property
    def input_skipped(self) -> int:
        """Quiet frames skipped to drain a backlog."""
        return self._drain.skipped

    @property
    def says_open(self) -> int:
        """Says asked for whose end has not been reported yet."""
        return len(self.says) + len(self.says_handed)

    @property
    def frame_seconds(self) -> float:
        return self.frame_length / self.sample_rate

    def stats(self) -> dict[str, Any]:
        return {
            "session": self.id,
            "live": self.live,
            "frames": self.frames,
            "underruns": self.underruns,
            "input_ms": round(1000 * len(self.input) / self.sample_rate, 1),
            "input_skipped": self.input_skipped,
            "output_queue_frames": len(self.output),
            "dropped_frames": self.output.dropped,
        }


@dataclass
class SchedulerStats:
    ticks: int = 0  # clock ticks run (with or without live sessions)
    steps: int = 0  # model steps run
    late_ticks: int = 0  # ticks whose outputs were ready after the next tick's deadline
    skipped_ticks: int = 0  # ticks dropped because the clock fell more than max_lag behind
    errors: int = 0  # model steps that raised
    step_seconds: collections.deque = field(default_factory=lambda: collections.deque(maxlen=1000))
    batch_sizes: collections.deque = field(default_factory=lambda: collections.deque(maxlen=1000))
    # the last ticks that ran a step, for the load over a recent window (Scheduler.load): (step seconds, late) at
    # each one's end; at most 1000 (40 s of 40 ms frames)
    recent: TimedWindow = field(default_factory=TimedWindow)

    def snapshot(self, frame_seconds: float) -> dict[str, Any]:
        steps = np.asarray(self.step_seconds, dtype=np.float64) * 1000
        pct = (lambda q: round(float(np.percentile(steps, q)), 3)) if len(steps) else (lambda q: None)
        return {
            "ticks": self.ticks,
            "steps": self.steps,
            "late_ticks": self.late_ticks,
            "skipped_ticks": self.skipped_ticks,
            "errors": self.errors,
            "step_ms_p50": pct(50),
            "step_ms_p99": pct(99),
            "step_ms_max": round(float(steps.max()), 3) if len(steps) else None,
            "frame_ms": round(1000 * frame_seconds, 3),
            "max_batch": max(self.batch_sizes) if self.batch_sizes else 0,
        }


class Scheduler:
    """Drives ``model`` with a frame clock; every live :class:`StreamSession` is one batch row.

    Use::

        scheduler = Scheduler(model)
        await scheduler.start()
        session = scheduler.open_session()       # a connection arrived
        scheduler.join(session)                  # its audio starts: it gets a row next tick
        await session.input.put(pcm)             # user audio; output frames appear in session.output
        scheduler.leave(session)                 # stop; or scheduler.close_session(session) when gone
        await scheduler.stop()

    ``max_sessions`` caps the batch rows; ``initial_capacity`` is the first batch size (it doubles
    when full and halves when a quarter full); ``input_seconds``/``output_seconds`` bound each
    session's buffers; past ``max_lag_frames`` of delay the clock skips ticks instead of bursting;
    ``use_thread=False`` runs the step on the event loop (tests).
    """

    def __init__(
        self,
        model: DuplexModel,
        *,
        max_sessions: int = 64,
        initial_capacity: int = 1,
        input_seconds: float = 2.0,
        output_seconds: float = 2.0,
        max_lag_frames: int = 10,
        use_thread: bool = True,
    ):
        self.model = model
        self.frame_length = int(model.frame_length)
        self.sample_rate = int(model.sample_rate)
        self.frame_seconds = self.frame_length / self.sample_rate
        self.max_sessions = max_sessions
        self.initial_capacity = max(1, initial_capacity)
        self.input_seconds = input_seconds
        self.output_seconds = output_seconds
        self.max_lag_frames = max_lag_frames
        self.use_thread = use_thread
        self.stats = SchedulerStats()
        self.sessions: dict[int, StreamSession] = {}  # every open session, live or not
        self._rows: dict[int, StreamSession] = {}  # row -> live session
        self._free_rows: list[int] = []  # heap: lowest free row first keeps the batch dense
        self._pending_join: list[StreamSession] = []
        self._pending_leave: list[StreamSession] = []
        self._pending_config: dict[int, StreamSession] = {}  # session id -> a live session whose options changed
        self._pending_says: dict[int, StreamSession] = {}  # session id -> a live session with texts to say
        self._pending_hush: dict[int, StreamSession] = {}  # session id -> a live session whose row stops what it says
        self._state: Any = None
        self.capacity = 0
        self._task: asyncio.Task | None = None
        self.on_error = None  # optional callback(exception, sessions dropped from the batch) after a failed step

    # -- sessions ------------------------------------------------------------------------

    def open_session(self) -> StreamSession:
        session = StreamSession(self.frame_length, self.sample_rate, self.input_seconds, self.output_seconds)
        self.sessions[session.id] = session
        return session

    def join(self, session: StreamSession) -> None:
        """Put ``session`` in the batch from the next tick (idempotent)."""
        if session.live or session.closed:
            return
        session.live = True
        session.frames = 0
        session.generation += 1
        self._pending_join.append(session)  # after a pending leave: the old row is freed first, a fresh one reset

    def leave(self, session: StreamSession) -> None:
        """Take ``session`` out of the batch from the next tick (idempotent); queued output stays."""
        if not session.live:
            return
        session.live = False
        session.says_handed.clear()  # the model forgets a row's says when it leaves (a CONTROL stop reports them: drop_says)
        if session in self._pending_join:
            self._pending_join.remove(session)
        else:
            self._pending_leave.append(session)

    def configure(self, session: StreamSession, options: dict[str, Any]) -> None:
        """Change ``session``'s settings for its row of the model (e.g. ``{"voice": NAME}``): kept for every later
        join, and handed to the model (``configure_rows``) at the next tick while the session is in the batch."""
        session.options = {**session.options, **options}
        if session.live:
            self._pending_config[session.id] = session

    def say(self, session: StreamSession, text: str, say_id: Any = None) -> None:
        """Ask the model to say ``text`` in ``session``'s row (its ``say_rows``): handed over at the next tick while the
        session is in the batch, else at its join (a say before the first AUDIO waits for it)."""
        session.says.append((text, say_id))
        if session.live:
            self._pending_says[session.id] = session

    def hush(self, session: StreamSession) -> list[tuple[str, Any]]:
        """``session``'s row stops what it is saying and forgets its says (the model's ``hush_rows``, at the next tick
        while the session is in the batch). Returns the says it had not handed to the model yet (dropped here)."""
        dropped = list(session.says)
        session.says.clear()  # (those handed over end with the model's own events)
        if session.live:
            self._pending_hush[session.id] = session
        return dropped

    def drop_says(self, session: StreamSession) -> list[Any]:
        """Forget ``session``'s says: those not yet handed to the model, and those handed over whose end it has not
        reported (a CONTROL stop: the row leaves the batch, and the model forgets its says with it; the say events of
        the frames it still makes are dropped). Returns their ids, for their ``dropped`` events."""
        ids = [*session.says_handed, *(say_id for _, say_id in session.says)]
        session.says.clear()
        session.says_handed.clear()
        return ids

    def close_session(self, session: StreamSession) -> None:
        self.leave(session)
        session.closed = True
        self.sessions.pop(session.id, None)
        session.input.clear()  # wakes a reader waiting for room

    @property
    def live_sessions(self) -> int:
        """Sessions in the batch or about to join it."""
        return sum(1 for s in self.sessions.values() if s.live)

    # -- clock ---------------------------------------------------------------------------

    async def start(self, warmup: bool = True) -> None:
        """Start the clock; ``warmup`` runs one throwaway step first (lazy inits, thread pool)."""
        if self._task is None:
            if warmup:
                await asyncio.to_thread(self._step, np.zeros((1, self.frame_length), np.float32), self.model.init_state(1))
            self._task = asyncio.create_task(self._run_clock(), name="frame-clock")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run_clock(self) -> None:
        """Tick at t0 + n * frame_seconds. Late ticks run back to back until caught up; more than
        ``max_lag_frames`` behind, the missed ticks are skipped (counted) rather than bursted."""
        loop = asyncio.get_running_loop()
        period = self.frame_seconds
        next_deadline = loop.time()
        while True:
            delay = next_deadline - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                await asyncio.sleep(0)  # let readers and writers run between back-to-back ticks
            steps = self.stats.steps
            await self.tick()
            next_deadline += period
            behind = loop.time() - next_deadline
            if behind > 0:  # this tick's output was ready only after the next tick was due
                self.stats.late_ticks += 1
            if self.stats.steps > steps:
                self.stats.recent.append(self.stats.step_seconds[-1], behind > 0)
            if behind > self.max_lag_frames * period:
                skipped = int(behind // period)
                self.stats.skipped_ticks += skipped
                next_deadline += skipped * period

    async def tick(self) -> None:
        """One frame for every live session: gather input, one batched step, scatter output."""
        self.stats.ticks += 1
        self._apply_membership()
        if not self._rows:
            return
        batch = np.zeros((self.capacity, self.frame_length), dtype=np.float32)
        rows = [(row, session, session.generation) for row, session in self._rows.items()]
        for row, session, _ in rows:
            frame = session.next_frame()
            if frame is not None:
                batch[row] = frame
                session.heard_audio = True
            elif session.heard_audio:
                session.underruns += 1
        start = time.perf_counter()
        try:
            if self.use_thread:
                pcm, texts, self._state = await asyncio.to_thread(self._step, batch, self._state)
            else:
                pcm, texts, self._state = self._step(batch, self._state)
        except Exception as e:  # a broken model must not take the event loop down
            self.stats.errors += 1
            log.exception("model step failed; resetting the batch")
            self._state = None
            self.capacity = 0
            dropped = list(self._rows.values())
            for session in dropped:
                session.live = False
                session.row = None
                session.says_handed.clear()
            self._rows.clear()
            self._free_rows.clear()
            if self.on_error is not None:
                self.on_error(e, dropped)
            return
        self.stats.step_seconds.append(time.perf_counter() - start)
        self.stats.batch_sizes.append(self.capacity)
        self.stats.steps += 1
        for row, session, generation in rows:
            if session.closed or session.generation != generation:
                continue
            text = texts[row]
            if isinstance(text, dict) and text.get("events"):
                text = _count_say_ends(session, text)
            session.output.push(OutputFrame(session.frames, pcm[row], text))
            session.frames += 1

    def _step(self, batch: np.ndarray, state: Any) -> tuple[np.ndarray, list[TextPiece], Any]:
        pcm, texts, state = self.model.step(torch.from_numpy(batch), state)
        pcm = pcm.detach().to("cpu", torch.float32).numpy()
        if pcm.shape != batch.shape or len(texts) != batch.shape[0]:
            raise RuntimeError(f"model.step returned pcm {pcm.shape} and {len(texts)} texts for a batch of {batch.shape}")
        return pcm, texts, state

    # -- rows ----------------------------------------------------------------------------

    def _apply_membership(self) -> None:
        for session in self._pending_leave:
            if session.row is not None:
                self._rows.pop(session.row, None)
                heapq.heappush(self._free_rows, session.row)
                session.row = None
        self._pending_leave.clear()
        joining, self._pending_join = self._pending_join, []
        joining = [s for s in joining if s.live and not s.closed]
        if joining:
            self._ensure_capacity(len(self._rows) + len(joining))
            new_rows = []
            for session in joining:
                session.row = heapq.heappop(self._free_rows)
                self._rows[session.row] = session
                new_rows.append(session.row)
            self._state = self.model.reset_rows(self._state, new_rows)
        elif self.capacity > self.initial_capacity and len(self._rows) <= self.capacity // 4:
            self._compact()
        if joining or self._pending_config or self._pending_says or self._pending_hush:  # the sessions' settings and says (most ticks: none)
            changed = {s.id: s for s in joining if s.options} | self._pending_config
            saying = {s.id: s for s in joining if s.says} | self._pending_says
            hushed = [s.row for s in self._pending_hush.values() if s.live and s.row is not None]
            self._pending_config, self._pending_says, self._pending_hush = {}, {}, {}
            self._configure({s.row: s.options for s in changed.values() if s.live and s.row is not None and s.options})
            self._hush(hushed)  # (before the says that came after it)
            saying = [s for s in saying.values() if s.live and s.row is not None and s.says]
            self._say({s.row: s.says for s in saying})
            for s in saying:
                s.says_handed.extend(say_id for _, say_id in s.says)
                s.says = []

    def _configure(self, options: dict[int, dict[str, Any]]) -> None:
        """The model's per-row settings (``configure_rows``); the server checks what sessions ask for first."""
        self._model_rows("configure_rows", options, "the sessions' settings")

    def _hush(self, rows: list[int]) -> None:
        """Rows stop what they are saying (``hush_rows``)."""
        self._model_rows("hush_rows", rows, "stopping rows")

    def _say(self, says: dict[int, list[tuple[str, Any]]]) -> None:
        """The sessions' texts for the model to say (``say_rows``; the server checks ``can_say`` first)."""
        self._model_rows("say_rows", says, "the sessions' says")

    def _model_rows(self, method: str, rows: Any, what: str) -> None:
        """Hand ``rows`` (per-row options, says, or row indices) to the model's ``method`` where it has one. A model
        without it, or one that refuses, keeps its rows as they were: it costs that request, not the batch."""
        call = getattr(self.model, method, None)
        if call is None or not rows:
            return
        try:
            self._state = call(self._state, rows)
        except Exception as e:  # noqa: BLE001
            log.warning("the model refused %s %s: %s", what, rows, e)

    def _ensure_capacity(self, needed: int) -> None:
        if self._state is None:
            self.capacity = max(self.initial_capacity, min(_next_power_of_two(needed), max(needed, self.max_sessions)))
            self._state = self.model.init_state(self.capacity)
            self._free_rows = list(range(self.capacity))
            return
        if needed <= self.capacity:
            return
        new_capacity = self.capacity
        while new_capacity < needed:
            new_capacity *= 2
        new_capacity = max(needed, min(new_capacity, self.max_sessions))  # no rows beyond what can ever be used
        self._state = grow_state(self.model, self._state, new_capacity)
        for row in range(self.capacity, new_capacity):
            heapq.heappush(self._free_rows, row)
        self.capacity = new_capacity

    def _compact(self) -> None:
        """Halve the batch (repeatedly) once it is at most a quarter full: live rows move to the front."""
        new_capacity = self.capacity
        while new_capacity > self.initial_capacity and len(self._rows) <= new_capacity // 4:
            new_capacity //= 2
        keep = sorted(self._rows)
        keep_all = keep + [row for row in range(self.capacity) if row not in self._rows][: new_capacity - len(keep)]
        self._state = shrink_state(self.model, self._state, keep_all)
        moved = {old: new for new, old in enumerate(keep_all)}
        self._rows = {moved[old]: session for old, session in self._rows.items()}
        for row, session in self._rows.items():
            session.row = row
        self._free_rows = list(range(len(keep), new_capacity))
        heapq.heapify(self._free_rows)
        self.capacity = new_capacity

    def load(self, window_seconds: float) -> dict[str, Any] | None:
        """The clock's load over its last ``window_seconds``, from the ticks that ran a step: their number, the share
        that was late, and the p90 of their step time as a share of the frame period (1.0 = the whole frame).
        None when no tick ran a step in the window (no live sessions)."""
        ticks = self.stats.recent.since(window_seconds)
        if not ticks:
            return None
        p90 = float(np.percentile([seconds for seconds, _ in ticks], 90))
        return {
            "ticks": len(ticks),
            "late_share": round(sum(late for _, late in ticks) / len(ticks), 3),
            "step_p90_share": round(p90 / self.frame_seconds, 3),
        }

    def snapshot(self) -> dict[str, Any]:
        return {
            **self.stats.snapshot(self.frame_seconds),
            "sessions": len(self.sessions),
            "live_sessions": self.live_sessions,
            "batch_capacity": self.capacity,
        }


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _count_say_ends(session: StreamSession, text: dict) -> dict:
    """A row's text piece with events: the says that ended leave ``session.says_handed``. A session that has left the
    batch (its says reported dropped by ``drop_says``) gets the piece without its events."""
    if not session.live:
        return {key: value for key, value in text.items() if key != "events"}
    for event in text["events"]:
        if isinstance(event, dict) and event.get("event") in SAY_ENDS:
            say_id = event.get("id")
            if say_id in session.says_handed:
                session.says_handed.remove(say_id)
    return text
