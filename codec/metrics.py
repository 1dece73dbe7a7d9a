"""Objective audio-quality metrics for codec evaluation.

SI-SDR and log-mel distance are computed here (numpy/torch only); STOI and PESQ-WB come
from ``pystoi`` and ``pesq`` (the ``[eval]`` extra) and are skipped when not installed.
Codecs delay their output; :func:`align` removes a constant lag (found by
cross-correlation) before scoring, as the benchmarks in DESIGN.md did.
"""

from __future__ import annotations

import numpy as np


def align(reference: np.ndarray, estimate: np.ndarray, max_lag: int = 800) -> tuple[np.ndarray, np.ndarray, int]:
    """Shift ``estimate`` by the lag in [0, max_lag] that best matches ``reference``; trim both to one length."""
    n = min(len(reference), len(estimate))
    ref, est = reference[:n].astype(np.float64), estimate[:n].astype(np.float64)
    best, best_lag = -np.inf, 0
    size = 1 << int(np.ceil(np.log2(2 * n)))
    corr = np.fft.irfft(np.fft.rfft(est, size) * np.conj(np.fft.rfft(ref, size)), size)
    for lag in range(0, min(max_lag, n - 1) + 1):
        if corr[lag] > best:
            best, best_lag = corr[lag], lag
    est = est[best_lag:]
    m = min(len(ref), len(est))
    return ref[:m].astype(np.float32), est[:m].astype(np.float32), best_lag


def si_sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Scale-invariant signal-to-distortion ratio in dB."""
    ref = reference.astype(np.float64) - reference.mean()
    est = estimate.astype(np.float64) - estimate.mean()
    target = (est @ ref) / (ref @ ref + 1e-12) * ref
    noise = est - target
    return float(10 * np.log10((target @ target + 1e-12) / (noise @ noise + 1e-12)))


def log_mel_distance(reference: np.ndarray, estimate: np.ndarray, sample_rate: int = 16000, n_mels: int = 80) -> float:
    """Mean absolute difference of log10 mel spectrograms (n_fft 1024, hop 256)."""
    import torch

    from .losses import mel_filterbank

    fb = torch.as_tensor(mel_filterbank(sample_rate, 1024, n_mels), dtype=torch.float32)
    window = torch.hann_window(1024)

    def logmel(x: np.ndarray) -> torch.Tensor:
        spec = torch.stft(torch.as_tensor(x, dtype=torch.float32), 1024, 256, window=window, return_complex=True).abs()
        return torch.log10(fb @ spec + 1e-5)

    n = min(len(reference), len(estimate))
    return float((logmel(reference[:n]) - logmel(estimate[:n])).abs().mean())


def stoi(reference: np.ndarray, estimate: np.ndarray, sample_rate: int = 16000) -> float | None:
    try:
        from pystoi import stoi as _stoi
    except ImportError:
        return None
    return float(_stoi(reference, estimate, sample_rate, extended=False))


def pesq_wb(reference: np.ndarray, estimate: np.ndarray, sample_rate: int = 16000) -> float | None:
    try:
        from pesq import pesq as _pesq
    except ImportError:
        return None
    try:
        return float(_pesq(sample_rate, reference, estimate, "wb"))
    except Exception:  # pesq raises on silent or too-short input
        return None


def all_metrics(reference: np.ndarray, estimate: np.ndarray, sample_rate: int = 16000) -> dict[str, float | None]:
    ref, est, lag = align(reference, estimate)
    return {
        "lag_ms": lag * 1000 / sample_rate,
        "si_sdr": si_sdr(ref, est),
        "log_mel": log_mel_distance(ref, est, sample_rate),
        "stoi": stoi(ref, est, sample_rate),
        "pesq_wb": pesq_wb(ref, est, sample_rate),
    }
