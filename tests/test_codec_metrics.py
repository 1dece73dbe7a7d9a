"""Codec metrics: the delay a benchmark removes before scoring is found even when the codec
synthesizes its own phase (then the waveform is nearly uncorrelated with the original)."""

from __future__ import annotations

import numpy as np
import torch

from speechlm.codec.metrics import align, log_mel_distance, si_sdr

SR = 16000


def speech_like(seconds: float = 3.0, seed: int = 0) -> np.ndarray:
    """Syllable-rate bursts of harmonics with a gliding pitch, plus fricative noise: an envelope to align on."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    pitch = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / SR
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    syllables = np.clip(np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 6)), 0, None) ** 2
    noise = rng.standard_normal(len(t)) * (np.sin(2 * np.pi * 1.3 * t) > 0.8)
    return (0.1 * voiced * syllables + 0.02 * noise).astype(np.float32)


def resynthesize_phase(x: np.ndarray, seed: int = 1) -> np.ndarray:
    """Keep the STFT magnitude, draw a random phase: what a vocoder-like decoder may output."""
    g = torch.Generator().manual_seed(seed)
    window = torch.hann_window(320)
    spec = torch.stft(torch.from_numpy(x), 320, 80, window=window, return_complex=True)
    phase = torch.rand(spec.shape, generator=g) * 2 * torch.pi
    return torch.istft(torch.polar(spec.abs(), phase), 320, 80, window=window, length=len(x)).numpy()


def delayed(x: np.ndarray, lag: int) -> np.ndarray:
    return np.concatenate([np.zeros(lag, np.float32), x])


def test_align_finds_the_exact_lag_of_a_delayed_copy():
    x = speech_like()
    ref, est, lag = align(x, delayed(0.7 * x, 137))
    assert lag == 137 and len(ref) == len(est)
    assert si_sdr(ref, est) > 40


def test_align_finds_the_lag_when_the_phase_is_resynthesized():
    x = speech_like(seed=3)
    y = resynthesize_phase(x)
    assert abs(np.corrcoef(x, y)[0, 1]) < 0.2  # sample by sample, nothing to correlate
    for lag in (0, 240, 640):
        _, _, found = align(x, delayed(y, lag))
        assert abs(found - lag) <= 8, (lag, found)
    ref, est, _ = align(x, delayed(y, 240))
    unaligned = delayed(y, 240)[: len(x)]
    assert log_mel_distance(ref, est) < 0.7 * log_mel_distance(x, unaligned)


def test_align_handles_short_and_silent_input():
    ref, est, lag = align(np.zeros(300, np.float32), np.zeros(400, np.float32))
    assert lag == 0 and len(ref) == len(est) == 300
    ref, est, lag = align(np.ones(10, np.float32), np.ones(5, np.float32))
    assert len(ref) == len(est) and 0 <= lag < 5
