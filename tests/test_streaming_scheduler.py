"""The scheduler without sockets: bounded buffers, rows joining/leaving/growing/shrinking
without changing any session's output, and a frame clock that catches up without drift."""

import asyncio
import time

import numpy as np
import pytest
import torch

from speechlm.codec.config import TINY_ARCHITECTURE, CodecConfig
from speechlm.codec.model import Codec
from speechlm.streaming.catchup import WINDOW
from speechlm.streaming.models import EchoCodecModel, SilenceModel, concat_states, select_rows, state_batch_size
from speechlm.streaming.scheduler import InputBuffer, OutputFrame, OutputQueue, Scheduler

from .test_streaming_browser import HearingLoopback

TINY = {**TINY_ARCHITECTURE, "num_quantizers": 2, "codebook_size": 32}


@pytest.fixture(scope="module")
def codec() -> Codec:
    torch.manual_seed(0)
    model = Codec(CodecConfig(**TINY)).eval()
    model.quantizer.init_random_codebooks_()
    return model


def speech(frames: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(frames * 640) / 16_000
    return (0.3 * np.sin(2 * np.pi * rng.uniform(100, 300) * t) + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


def test_input_buffer_wraps_and_applies_back_pressure():
    async def main():
        buffer = InputBuffer(1000)
        data = np.arange(2500, dtype=np.float32)
        writer = asyncio.create_task(buffer.put(data))
        await asyncio.sleep(0.01)
        assert not writer.done() and len(buffer) == 1000  # full: the producer waits
        got = []
        for _ in range(50):
            frame = buffer.read(300)
            if frame is not None:
                got.append(frame)
            await asyncio.sleep(0)
            if writer.done() and len(buffer) < 300:
                break
        await writer
        assert buffer.read(len(buffer) + 1) is None  # a partial frame stays put
        got.append(buffer.read(len(buffer)))
        np.testing.assert_array_equal(np.concatenate(got), data)

    asyncio.run(asyncio.wait_for(main(), 10))


def test_output_queue_drops_oldest_and_counts():
    queue = OutputQueue(3)
    for i in range(5):
        queue.push(OutputFrame(i, np.zeros(4, np.float32), None))
    assert len(queue) == 3 and queue.dropped == 2
    assert [queue.pop().index for _ in range(3)] == [2, 3, 4]


def test_output_queue_keeps_the_say_events_of_frames_it_drops_or_clears():
    """A slow reader loses audio, not how its says ended: the events of dropped and flushed frames are kept, in order."""
    queue = OutputQueue(2)

    def frame(i, *events):
        return OutputFrame(i, np.zeros(4, np.float32), {"model": "", "events": [{"id": e[0], "event": e[1]} for e in events]})

    queue.push(frame(0, (1, "started")))
    queue.push(frame(1))
    queue.push(frame(2, (1, "done"), (2, "started")))  # frame 0 dropped: its event kept
    assert queue.take_kept_events() == [(0, {"id": 1, "event": "started"})] and queue.take_kept_events() == []
    queue.forget_says([2])  # say 2 dropped (a stop): its "started" leaves the queued frame; say 1's "done" stays
    assert queue.clear() == 2
    assert queue.take_kept_events() == [(2, {"id": 1, "event": "done"})]
    for i in range(OutputQueue.MAX_KEPT_EVENTS + 5):  # bounded: a reader that never reads
        queue.push(frame(i, (i, "done")))
    assert len(queue.take_kept_events()) == OutputQueue.MAX_KEPT_EVENTS


def test_state_surgery_roundtrip(codec):
    model = EchoCodecModel(codec)
    a, b = model.init_state(2), model.init_state(3)
    both = concat_states(a, b)
    assert state_batch_size(both) == 5
    picked = select_rows(both, [4, 0])
    assert state_batch_size(picked) == 2 and picked.encoder.analysis.shape[0] == 2


def run_ticks(scheduler: Scheduler, plan: dict[int, list], sessions: dict, inputs: dict, ticks: int) -> None:
    """Tick ``ticks`` times; ``plan[t]`` is a list of ("join"|"leave", name) applied before tick t."""

    async def main():
        for t in range(ticks):
            for action, name in plan.get(t, []):
                if action == "join":
                    sessions[name] = scheduler.open_session()
                    scheduler.join(sessions[name])
                else:
                    scheduler.leave(sessions[name])
            for name, session in sessions.items():
                if session.live:
                    frame = inputs[name][session.frames * 640 : (session.frames + 1) * 640]
                    await session.input.put(frame if len(frame) else np.zeros(640, np.float32))
            await scheduler.tick()

    asyncio.run(asyncio.wait_for(main(), 30))


def drain(session) -> np.ndarray:
    return np.concatenate([session.output.pop().pcm for _ in range(len(session.output))])


def test_joins_leaves_growth_and_compaction_do_not_change_a_session(codec):
    inputs = {name: speech(12, seed) for seed, name in enumerate("abcde")}
    solo: dict = {}
    run_ticks(Scheduler(EchoCodecModel(codec), use_thread=False, output_seconds=10), {0: [("join", "a")]}, solo, inputs, 12)

    model = EchoCodecModel(codec)
    scheduler = Scheduler(model, use_thread=False, output_seconds=10)
    crowd: dict = {}
    plan = {
        0: [("join", "a")],
        2: [("join", "b")],  # capacity 1 -> 2
        3: [("join", "c"), ("join", "d")],  # 2 -> 4
        4: [("join", "e")],  # 4 -> 8
        6: [("leave", "b"), ("leave", "c"), ("leave", "d")],
        7: [("leave", "e")],  # a alone in 8 rows -> compacted
    }
    run_ticks(scheduler, plan, crowd, inputs, 12)
    assert model.max_batch_seen == 8
    assert scheduler.capacity < 8, "the batch should shrink once it is mostly empty"
    assert crowd["a"].row is not None and scheduler.live_sessions == 1
    np.testing.assert_allclose(drain(crowd["a"]), drain(solo["a"]), atol=1e-5)
    # e joined late: its own stream starts with a silent frame, then its echo.
    e = drain(crowd["e"])
    assert len(e) == 3 * 640 and np.abs(e[:640]).max() == 0 and np.abs(e[640:]).max() > 0


def test_rejoin_after_leave_starts_a_fresh_stream(codec):
    scheduler = Scheduler(EchoCodecModel(codec), use_thread=False, output_seconds=10)
    inputs = {"a": speech(10, 7)}
    sessions: dict = {}
    run_ticks(scheduler, {0: [("join", "a")]}, sessions, inputs, 3)
    first = drain(sessions["a"])
    session = sessions["a"]
    scheduler.leave(session)
    scheduler.join(session)  # leave + join between ticks: a fresh row state

    async def again():
        for _ in range(3):
            await session.input.put(inputs["a"][session.frames * 640 : (session.frames + 1) * 640])
            await scheduler.tick()

    asyncio.run(again())
    np.testing.assert_allclose(drain(session), first, atol=1e-5)
    assert len(scheduler._rows) == 1


def test_underruns_are_counted_and_filled_with_silence():
    scheduler = Scheduler(SilenceModel(), use_thread=False)
    session = scheduler.open_session()
    scheduler.join(session)

    async def main():
        await session.input.put(np.ones(640 * 2, np.float32))
        for _ in range(5):
            await scheduler.tick()

    asyncio.run(main())
    assert session.frames == 5 and session.underruns == 3 and len(session.output) == 5


def _talk(frames: int, seed: int = 0) -> np.ndarray:
    """(frames, 640): half a second of a voice-like tone, then half a second of room noise (-54 dBFS), over and over."""
    rng = np.random.default_rng(seed)
    t = np.arange(640) / 16_000
    out = 0.002 * rng.standard_normal((frames, 640))
    for i in range(frames):
        if i % 25 < 12:
            out[i] += 0.2 * np.sin(2 * np.pi * 180 * (t + i * 0.04))
    return out.astype(np.float32)


@pytest.mark.parametrize("catch_up", [True, False])
def test_a_stalls_backlog_drains_in_the_pauses(catch_up):
    """The user's audio arrives a frame a tick, but a stall left 10 frames waiting: with catch_up the backlog is drained
    by skipping quiet frames (the noise between the talk), never a loud one, down to CATCH_UP_FRAMES; without it the
    10 frames of delay stay."""
    model = HearingLoopback()
    scheduler = Scheduler(model, use_thread=False)
    session = scheduler.open_session()
    session.catch_up = catch_up
    scheduler.join(session)
    audio = _talk(300)
    levels = np.sqrt((audio**2).mean(axis=1))

    async def main():
        await session.input.put(audio[:10].reshape(-1))  # the stall: 10 frames more than the ticks take
        backlogs = []
        for i in range(10, 300):
            await session.input.put(audio[i])
            await scheduler.tick()
            backlogs.append(len(session.input) // 640)
        return backlogs

    backlogs = asyncio.run(main())
    heard = np.sqrt((np.stack(model.heard) ** 2).mean(axis=1))
    if not catch_up:
        assert session.input_skipped == 0 and backlogs[-1] == 10
        np.testing.assert_allclose(heard, levels[: len(heard)], rtol=1e-5)
        return
    assert session.input_skipped == 10 - session.CATCH_UP_FRAMES and backlogs[-1] == session.CATCH_UP_FRAMES, backlogs
    assert session.stats()["input_skipped"] == session.input_skipped
    loud = levels > 0.05
    assert (heard > 0.05).sum() == loud[: len(heard) + session.input_skipped].sum()  # every loud frame heard
    assert backlogs[: WINDOW - 1] == [10] * (WINDOW - 1)  # a second's patience first


def test_nothing_is_quiet_in_a_steady_sound():
    """A steady tone (or a long stretch of talk without a pause) has no quiet frames: a backlog under it stays."""
    scheduler = Scheduler(SilenceModel(), use_thread=False)
    session = scheduler.open_session()
    scheduler.join(session)
    t = np.arange(640 * 200) / 16_000
    tone = (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32).reshape(200, 640)

    async def main():
        await session.input.put(tone[:8].reshape(-1))
        for i in range(8, 200):
            await session.input.put(tone[i])
            await scheduler.tick()

    asyncio.run(main())
    assert session.input_skipped == 0 and len(session.input) == 8 * 640


class SlowOnce(SilenceModel):
    """Stalls once for ``stall`` seconds at step ``at``."""

    def __init__(self, stall: float, at: int = 5):
        super().__init__(frame_length=160)  # 10 ms frames keep the test short
        self.stall, self.at, self.calls = stall, at, 0

    def step(self, user_pcm, state):
        self.calls += 1
        if self.calls == self.at:
            time.sleep(self.stall)
        return super().step(user_pcm, state)


@pytest.mark.parametrize("stall, skips", [(0.035, False), (0.3, True)])
def test_clock_catches_up_without_drift(stall, skips):
    async def main():
        scheduler = Scheduler(SlowOnce(stall), max_lag_frames=10)
        session = scheduler.open_session()
        scheduler.join(session)
        await scheduler.start(warmup=False)
        start = time.perf_counter()
        await asyncio.sleep(0.8)
        elapsed = time.perf_counter() - start
        await scheduler.stop()
        return scheduler.stats, elapsed

    stats, elapsed = asyncio.run(main())
    expected = elapsed / 0.010
    assert stats.late_ticks >= 1
    if skips:
        assert stats.skipped_ticks >= 15  # 300 ms behind with a 100 ms limit: skipped, not bursted
        assert abs(stats.ticks + stats.skipped_ticks - expected) <= 8
    else:
        assert stats.skipped_ticks == 0
        assert abs(stats.ticks - expected) <= 8, (stats.ticks, expected)  # caught up: no drift


def test_a_failing_step_drops_the_batch_and_the_clock_goes_on():
    class Broken(SilenceModel):
        def step(self, user_pcm, state):
            raise RuntimeError("boom")

    failures = []

    async def main():
        scheduler = Scheduler(Broken(), use_thread=False)
        scheduler.on_error = lambda error, sessions: failures.append((str(error), [s.id for s in sessions]))
        session = scheduler.open_session()
        scheduler.join(session)
        await scheduler.tick()
        await scheduler.tick()
        return scheduler, session

    scheduler, session = asyncio.run(main())
    assert failures == [("boom", [session.id])]
    assert scheduler.stats.errors == 1 and not session.live and scheduler.capacity == 0
