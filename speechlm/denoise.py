"""Spectral noise suppression for what the speech LM hears (a room's steady noise under a question).

The speech LM learned to hear from clean synthetic speech whose pauses are digital silence; a faint
steady noise under a question (a fan, a hum, a microphone's hiss) costs its ASR many words. This is
a classic short-time spectral gate (Wiener-like, with a gain floor against "musical" noise)::

    STFT (32 ms Hann window, 8 ms hop) -> power P (frames, bins)
    noise N(f)   = the mean power of a stretch of the room alone, per bin (e.g. the quiet before the question)
    gain G       = max(floor, 1 - over * N / P), smoothed over 3 frames and 3 bins
    audio        = ISTFT(G * STFT)

Speech far above the noise passes nearly untouched; the room under it drops to ``floor`` (-20 dB).
:func:`speechlm.speech.hearing_audio` uses it when a recording starts with a stretch of quiet.
"""

from __future__ import annotations

import numpy as np
import torch

N_FFT = 512  # 32 ms at 16 kHz
HOP = 128  # 8 ms


def spectral_denoise(audio: np.ndarray, noise: np.ndarray, *, over: float = 2.0, floor: float = 0.1) -> np.ndarray:
    """audio (T,) float32 at 16 kHz -> the same length with the steady noise of ``noise`` (a stretch of
    the room alone, e.g. the quiet before the speech) suppressed (see the module doc). Audio shorter
    than a window, or a noise sample shorter than one or digitally silent, comes back as it was."""
    audio, noise = np.asarray(audio, dtype=np.float32), np.asarray(noise, dtype=np.float32)
    if audio.size < N_FFT or noise.size < N_FFT or not np.any(noise):
        return audio.copy()
    window = torch.hann_window(N_FFT)
    noise_power = torch.stft(torch.from_numpy(noise), N_FFT, HOP, window=window, return_complex=True, center=False).abs().square()
    spec = torch.stft(torch.from_numpy(audio), N_FFT, HOP, window=window, return_complex=True)  # (bins, frames)
    gain = (1.0 - over * noise_power.mean(dim=1, keepdim=True) / spec.abs().square().clamp(min=1e-12)).clamp(min=floor)
    gain = torch.nn.functional.avg_pool2d(gain[None, None], 3, stride=1, padding=1, count_include_pad=False)[0, 0]
    return torch.istft(spec * gain, N_FFT, HOP, window=window, length=audio.size).numpy().astype(np.float32)
