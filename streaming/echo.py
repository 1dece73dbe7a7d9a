"""Echo cancellation for a client that plays the model through speakers and listens through a microphone.

Through speakers the model's own voice comes back into the microphone, and the server cannot tell it from the
user: the speech gate hears speech, the duplex model yields to it and the answer assist pauses its reply — the model
talks over itself. The browser page asks ``getUserMedia`` for the browser's echo cancellation; ``speechlm client
--mic`` does the same with WebRTC's audio processing (AEC3, the canceller browsers use), through the ``livekit``
package's ``AudioProcessingModule`` (the optional extra ``speechlm[mic]``; without it, use headphones).

:class:`EchoCanceller` is told what the speakers play (:meth:`EchoCanceller.played`, the far end) and cleans what the
microphone hears (:meth:`EchoCanceller.clean`, the near end); WebRTC finds the delay between the two itself (a hint:
``delay_ms``, the sound card's output plus input latency). Audio is float32 at 16 kHz, in blocks of whole 10 ms
(WebRTC's frame); the two sides may be called from different threads (the sound card's).
"""

from __future__ import annotations

import threading

import numpy as np

from .client import ClientError


def import_livekit_rtc():
    """livekit.rtc, or a ClientError that says what to install."""
    try:
        from livekit import rtc
    except (ImportError, OSError) as e:
        raise ClientError(f"echo cancellation needs the livekit package (pip install 'speechlm[mic]'), or use headphones and --no-echo-cancel: {e}") from None
    return rtc


def _int16(pcm: np.ndarray) -> bytearray:
    return bytearray((np.clip(pcm, -1.0, 1.0) * 32767.0).round().astype(np.int16).tobytes())


class EchoCanceller:
    """WebRTC's echo canceller (and high-pass filter) over float32 blocks of whole 10 ms at ``sample_rate``."""

    def __init__(self, sample_rate: int = 16_000, delay_ms: int = 0, noise_suppression: bool = False) -> None:
        self.rtc = import_livekit_rtc()
        if sample_rate % 100:
            raise ClientError(f"echo cancellation needs a sample rate of whole 10 ms frames, not {sample_rate} Hz")
        self.sample_rate, self.step = sample_rate, sample_rate // 100
        self._apm = self.rtc.AudioProcessingModule(echo_cancellation=True, noise_suppression=noise_suppression, high_pass_filter=True)
        self._lock = threading.Lock()  # the two sides come from the sound card's two threads
        self._far = np.zeros(0, np.float32)  # played audio short of a 10 ms frame
        self.set_delay_ms(delay_ms)

    def set_delay_ms(self, delay_ms: float) -> None:
        """The hint of how long played audio takes to come back into the microphone (output + input latency)."""
        with self._lock:
            self._apm.set_stream_delay_ms(max(0, round(delay_ms)))

    def played(self, pcm: np.ndarray) -> None:
        """What the speakers are about to play (float32, any length; a part short of 10 ms waits for the next)."""
        audio = np.concatenate([self._far, np.asarray(pcm, np.float32).reshape(-1)])
        whole = len(audio) // self.step * self.step
        self._far = audio[whole:]
        with self._lock:
            for start in range(0, whole, self.step):
                self._apm.process_reverse_stream(self._frame(audio[start : start + self.step]))

    def clean(self, pcm: np.ndarray) -> np.ndarray:
        """What the microphone heard (float32, whole 10 ms frames) -> the same without the speakers' echo."""
        pcm = np.asarray(pcm, np.float32).reshape(-1)
        if len(pcm) % self.step:
            raise ClientError(f"echo cancellation takes whole 10 ms blocks ({self.step} samples), not {len(pcm)} samples")
        out = np.empty_like(pcm)
        with self._lock:
            for start in range(0, len(pcm), self.step):
                frame = self._frame(pcm[start : start + self.step])
                self._apm.process_stream(frame)
                out[start : start + self.step] = np.frombuffer(frame.data, np.int16).astype(np.float32) / 32767.0
        return out

    def _frame(self, pcm: np.ndarray):
        return self.rtc.AudioFrame(_int16(pcm), self.sample_rate, 1, len(pcm))
