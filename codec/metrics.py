"""Objective audio-quality metrics for codec evaluation.

SI-SDR and log-mel distance are computed here (numpy/torch only); STOI and PESQ-WB come
from ``pystoi`` and ``pesq`` (the ``[eval]`` extra) and are skipped when not installed.
Codecs delay their output; :func:`align` removes a constant lag (found on magnitude spectra,
which do not depend on the codec's phase, then refined on the waveform) before scoring.
"""

from __future__ import annotations

import numpy as np


def align(reference: np.ndarray, estimate: np.ndarray, max_lag: int = 800, hop: int = 16) -> tuple[np.ndarray, np.ndarray, int]:
    """Shift ``estimate`` by the lag in [0, max_lag] that best matches ``reference``; trim both to one length.

    The lag is found on short-time magnitude spectra (n_fft 256, ``hop`` samples), which do not
    depend on phase, then refined to the sample by waveform cross-correlation within one hop.
    Waveform cross-correlation alone fails on codecs that synthesize their own phase (vocoders
    such as Codec2, and iSTFT decoders such as ours): their output is nearly uncorrelated with
    the input sample by sample, and the peak lands on an arbitrary lag.
    """
    n = min(len(reference), len(estimate))
    ref, est = reference[:n].astype(np.float64), estimate[:n].astype(np.float64)
    max_lag = max(0, min(max_lag, n - 1))
    coarse = _envelope_lag(ref, est, max_lag, hop) if n >= 4 * 256 else 0
    lo, hi = max(0, coarse - hop), min(max_lag, coarse + hop)
    best, best_lag = -np.inf, coarse
    for lag in range(lo, hi + 1):
        score = float(ref[: n - lag] @ est[lag:])
        if score > best:
            best, best_lag = score, lag
    est = est[best_lag:]
    m = min(len(ref), len(est))
    return ref[:m].astype(np.float32), est[:m].astype(np.float32), best_lag


def _envelope_lag(ref: np.ndarray, est: np.ndarray, max_lag: int, hop: int, n_fft: int = 256, bands: int = 32) -> int:
    """The lag (a multiple of ``hop``) maximizing the correlation of compressed, mean-removed
    magnitude spectra (the FFT bins averaged into ``bands`` bands)."""
    import torch

    window = torch.hann_window(n_fft, dtype=torch.float64)

    def spectra(x: np.ndarray) -> torch.Tensor:
        spec = torch.stft(torch.from_numpy(x), n_fft, hop, window=window, center=False, return_complex=True).abs()[1:]
        mag = spec.reshape(bands, -1, spec.shape[-1]).mean(dim=1) ** 0.3  # (bands, frames)
        return mag - mag.mean(dim=1, keepdim=True)

    r, e = spectra(ref), spectra(est)
    size = 1 << int(np.ceil(np.log2(2 * r.shape[1])))
    corr = torch.fft.irfft(torch.fft.rfft(e, size) * torch.fft.rfft(r, size).conj(), size).sum(dim=0)
    steps = min(max_lag // hop, r.shape[1] - 1)
    return int(torch.argmax(corr[: steps + 1])) * hop


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
