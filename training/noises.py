"""Noises of a room, as the speech detector's training and the room augmentation draw them: each kind a
function of a seeded generator (:func:`noise`), of unit RMS.

:data:`TRAIN_NOISES`: colored noise, mains hum, tones, harmonic buzzes, clicks (typing), slowly modulated and
band-limited noise, music-like notes, frequency sweeps. :data:`HELD_OUT_NOISES` (a siren, rain, a revving engine) are
never trained on: the benchmarks measure on them as noise not met before.
"""

from __future__ import annotations

import numpy as np

from ..codec.audio import SAMPLE_RATE
from ..codec.errors import SpeechLMError

TRAIN_NOISES = ("white", "pink", "brown", "hum", "tone", "buzz", "clicks", "modulated", "band", "music", "sweep")
HELD_OUT_NOISES = ("siren", "rain", "engine")


def colored_noise(n: int, kind: str, rng: np.random.Generator, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """(n,) float32 noise of unit RMS: ``white``, ``pink`` (power ∝ 1/f), ``brown`` (1/f², above 20 Hz) or
    ``hum`` (mains at 50 or 60 Hz with decaying harmonics over white noise 20 dB below)."""
    if n <= 0:
        return np.zeros(0, np.float32)
    if kind == "hum":
        t = np.arange(n) / sample_rate
        base = rng.choice((50.0, 60.0))
        y = sum(np.sin(2 * np.pi * base * k * t + rng.uniform(0, 2 * np.pi)) / k for k in range(1, 8))
        y = y / np.sqrt(np.mean(y**2)) + 0.1 * rng.standard_normal(n)
    elif kind in ("white", "pink", "brown"):
        spectrum = np.fft.rfft(rng.standard_normal(n))
        if kind != "white":
            freqs = np.fft.rfftfreq(n, 1 / sample_rate)
            power = {"pink": 1, "brown": 2}[kind]
            spectrum = spectrum / np.maximum(freqs, 20.0) ** (power / 2)
        y = np.fft.irfft(spectrum, n)
    else:
        raise SpeechLMError(f"unknown noise {kind!r} (colored noise): choose from white, pink, brown, hum")
    rms = float(np.sqrt(np.mean(y**2)))
    return (y / max(rms, 1e-12)).astype(np.float32)


def noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) float32 noise of unit RMS of a kind in :data:`TRAIN_NOISES` or :data:`HELD_OUT_NOISES`."""
    t = np.arange(n) / SAMPLE_RATE
    if kind in ("white", "pink", "brown", "hum"):
        return colored_noise(n, kind, rng)
    if kind == "tone":  # one to three steady sines (a beep, a whine), a little vibrato
        y = sum(np.sin(2 * np.pi * f * t + 0.002 * f * np.sin(2 * np.pi * rng.uniform(2, 7) * t) + rng.uniform(0, 6.3))
                for f in np.exp(rng.uniform(np.log(80), np.log(5000), rng.integers(1, 4))))
    elif kind == "buzz":  # a steady sawtooth of 50-300 Hz (an engine, a buzzer: every harmonic at 1/k)
        y = 2 * np.mod(rng.uniform(50, 300) * t + rng.uniform(0, 1), 1.0) - 1
    elif kind == "clicks":  # short decaying bursts at random times (typing, ticking)
        y = np.zeros(n)
        burst = int(rng.uniform(0.003, 0.03) * SAMPLE_RATE)
        shape = rng.standard_normal(burst) * np.exp(-np.arange(burst) / (burst / 4))
        for start in rng.integers(0, max(1, n - burst), rng.poisson(rng.uniform(2, 30) * n / SAMPLE_RATE) + 1):
            y[start:start + burst] += shape * rng.uniform(0.3, 1.0)
    elif kind == "modulated":  # noise swelling and fading at 0.5-8 Hz (a fan's beat, wind, breathing)
        envelope = (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.5, 8) * t + rng.uniform(0, 6.3))) ** rng.uniform(1, 4)
        y = colored_noise(n, str(rng.choice(["white", "pink", "brown"])), rng) * envelope
    elif kind == "band":  # noise in one band of a third of an octave to two octaves
        y = _band(rng.standard_normal(n), rng)
    elif kind == "music":  # notes of harmonic tones, one to three at once, changing every 0.12-0.6 s
        y, start = np.zeros(n), 0
        while start < n:
            length = min(n - start, int(rng.uniform(0.12, 0.6) * SAMPLE_RATE))
            tt = np.arange(length) / SAMPLE_RATE
            envelope = np.minimum(1, tt / 0.01) * np.exp(-tt * rng.uniform(0.5, 6))
            for _ in range(rng.integers(1, 4)):
                f0 = 110 * 2 ** (rng.integers(0, 36) / 12)
                y[start:start + length] += envelope * sum(np.sin(2 * np.pi * f0 * k * tt) / k**1.5 for k in range(1, 8) if f0 * k < 7000)
            start += length
    elif kind == "sweep":  # rising or falling sweeps of a pure or harmonic tone, 0.1-1 s each
        y, start = np.zeros(n), 0
        while start < n:
            length = min(n - start, int(rng.uniform(0.1, 1.0) * SAMPLE_RATE))
            f = np.exp(np.linspace(*np.log(rng.uniform(100, 4000, 2)), length))
            phase = 2 * np.pi * np.cumsum(f) / SAMPLE_RATE
            y[start:start + length] = sum(np.sin(k * phase) / k for k in range(1, rng.integers(2, 6)))
            start += length
    elif kind == "siren":  # a tone (and a harmonic or two) whose pitch swings slowly up and down
        f = rng.uniform(400, 1500) * (1 + rng.uniform(0.1, 0.4) * np.sin(2 * np.pi * rng.uniform(0.2, 3) * t + rng.uniform(0, 6.3)))
        phase = 2 * np.pi * np.cumsum(f) / SAMPLE_RATE
        y = sum(np.sin(k * phase) / k for k in range(1, rng.integers(2, 4)))
    elif kind == "rain":  # hundreds of tiny drops a second over a bed of pink noise
        y = np.zeros(n)
        drops = rng.integers(0, n, rng.poisson(rng.uniform(100, 1000) * n / SAMPLE_RATE) + 1)
        y[drops] = rng.standard_normal(len(drops))
        y = np.convolve(y, np.exp(-np.arange(40) / 8), mode="same") + 0.3 * colored_noise(n, "pink", rng) * np.sqrt(np.mean(y**2) + 1e-12)
    elif kind == "engine":  # a motor revving: a sawtooth whose pitch glides between 40 and 200 Hz, in one band
        f0 = np.exp(np.interp(t, np.linspace(0, t[-1] if n else 0, 6), rng.uniform(np.log(40), np.log(200), 6)))
        y = _band(2 * np.mod(np.cumsum(f0) / SAMPLE_RATE, 1.0) - 1, rng)
    else:
        raise SpeechLMError(f"unknown noise {kind!r}; choose from {', '.join(TRAIN_NOISES + HELD_OUT_NOISES)}")
    rms = float(np.sqrt(np.mean(np.square(y)))) if n else 0.0
    return (y / max(rms, 1e-12)).astype(np.float32)


def _band(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    spectrum = np.fft.rfft(y)
    freqs = np.fft.rfftfreq(len(y), 1 / SAMPLE_RATE)
    center, octaves = np.exp(rng.uniform(np.log(150), np.log(6000))), rng.uniform(1 / 3, 2)
    spectrum[(freqs < center * 2 ** (-octaves / 2)) | (freqs > center * 2 ** (octaves / 2))] = 0
    return np.fft.irfft(spectrum, len(y))


def noise_mix(kinds: tuple[str, ...], n: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) unit-RMS noise: one kind of ``kinds``, or two summed at random weights."""
    picked = rng.choice(len(kinds), size=rng.integers(1, 3), replace=False)
    y = sum(noise(kinds[k], n, rng) * rng.uniform(0.3, 1.0) for k in picked)
    return (y / max(float(np.sqrt(np.mean(np.square(y)))), 1e-12)).astype(np.float32)
