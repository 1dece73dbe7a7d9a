"""Draining a lasting audio backlog in the quiet: the delay a network stall adds should not stay.

A real-time audio path that keeps late audio (the server's input buffer, a client's playback buffer) turns every
stall into delay for the rest of the conversation: the frames held back arrive at once and wait behind each other.
:class:`CatchUp` watches the backlog frame by frame; when more than ``cushion`` frames have stayed queued through a
whole window (a second), it lets one quiet frame go (``skip`` returns True), one a frame, until the backlog is back
to the cushion. Quiet is relative to the stream's own recent levels: a frame near their noise floor (5th percentile),
where the recent audio has louder parts (90th percentile well above the floor): a steady sound — a tone, or a long
stretch of talk without a pause — has nothing quiet in it, and waits for a pause. The same logic runs in the browser
page's playback (``web/audio-worklet.js``).
"""

from __future__ import annotations

import collections

import numpy as np

WINDOW = 25  # frames a backlog must last (1 s at 40 ms)
LEVELS = 250  # recent frames whose levels give the noise floor (10 s)
QUIET_OVER_FLOOR = 2.0  # a frame at most this many times the floor's RMS is quiet ...
CONTRAST = 4.0  # ... when the recent frames' 90th percentile is at least this many times the floor
MIN_FLOOR = 1e-4  # digital silence


class CatchUp:
    """Feed :meth:`skip` every frame's RMS and the backlog (frames queued behind it); it says which frames may go."""

    def __init__(self, cushion: int = 1, window: int = WINDOW):
        self.cushion, self.window = cushion, window
        self._backlogs: collections.deque[int] = collections.deque(maxlen=window)
        self._levels: collections.deque[float] = collections.deque(maxlen=LEVELS)
        self.skipped = 0

    def skip(self, level: float, backlog: int) -> bool:
        """Whether the frame of RMS ``level``, with ``backlog`` frames queued behind it, should be skipped."""
        self._levels.append(float(level))
        self._backlogs.append(int(backlog))
        if len(self._backlogs) < self.window or min(self._backlogs) <= self.cushion or not self.is_quiet(level):
            return False
        self.skipped += 1
        self._backlogs = collections.deque((b - 1 for b in self._backlogs), maxlen=self.window)  # one frame less now
        return True

    def underrun(self) -> None:
        """The queue ran dry: no backlog to drain."""
        self._backlogs.clear()

    def is_quiet(self, level: float) -> bool:
        floor, loud = np.percentile(self._levels, [5, 90]) if self._levels else (MIN_FLOOR, MIN_FLOOR)
        floor = max(MIN_FLOOR, float(floor))
        return level <= QUIET_OVER_FLOOR * floor and loud >= CONTRAST * floor


def rms(pcm: np.ndarray) -> float:
    """RMS of a 1-D frame (a dot product: ~1 us for 640 samples, paid per session per tick)."""
    pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
    return float(np.sqrt(np.dot(pcm, pcm) / len(pcm))) if len(pcm) else 0.0
