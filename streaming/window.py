"""A record of recent events over wall-clock time, for readings over the last few seconds (the server's load)."""

from __future__ import annotations

import collections
import time


class TimedWindow:
    """The last ``maxlen`` events, each a tuple of values stamped with ``time.monotonic()`` when appended.
    Safe to read from another thread while one appends (the copy is one step under the GIL)."""

    def __init__(self, maxlen: int = 1000):
        self._events: collections.deque = collections.deque(maxlen=maxlen)

    def append(self, *values) -> None:
        self._events.append((time.monotonic(), values))

    def since(self, seconds: float) -> list[tuple]:
        """The values of the events of the last ``seconds``, oldest first."""
        start = time.monotonic() - seconds
        return [values for at, values in list(self._events) if at >= start]
