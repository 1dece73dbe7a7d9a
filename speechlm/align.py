"""Word timestamps for a recording and its transcript: CTC forced alignment with the pronunciation checker.

The speech corpora of ``speechlm data synth`` get word timestamps from their teachers; recordings of people do not
come with them. :func:`align_words` finds them: the pronunciation checker (``speechlm.checker``, a CTC phoneme
recognizer) reads the audio's phoneme log-probabilities at 50 frames a second, and the Viterbi path of the
transcript's phonemes (espeak-ng's, as the checker learnt them) through them says which frames say which phoneme, so
which say which word. CTC marks a phoneme by a short peak, so the blank frames between two words' phonemes are
shared out by the sound: a word extends over the voiced frames next to it, and a quiet stretch between two words
is the pause between them (``AlignConfig``). ``speechlm data import`` uses it to turn recordings with transcripts
into a corpus that ``speechlm data tokenize`` and the LM's interleaving read like a synthetic one.

Shapes: audio (T,) float32 at 16 kHz; log-probabilities (F, V), F = T / 320; a word's start and end in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .codec.errors import SpeechLMError
from .training.textnorm import normalize_text, word_spans


class AlignError(SpeechLMError):
    """The transcript cannot be aligned to the audio (no words, too many phonemes for the audio's length)."""


@dataclass
class AlignConfig:
    # a 20 ms frame is quiet below this RMS (about -40 dBFS), or below quiet_share of the utterance's loud level
    # (its 90th-percentile frame RMS), whichever is higher: such frames between two words are the pause between them.
    # A word's end reaches over its fading tail, down to tail_share of that level (chosen on training voices:
    # ends within 40 ms of the truth 67 -> 79 %, starts as they were)
    quiet_rms: float = 0.01
    quiet_share: float = 0.1
    tail_rms: float = 0.005
    tail_share: float = 0.03
    # a word's first and last phoneme peaks move out by this many frames at most to take in its voiced frames
    # (the first word's start and the last word's end; between two words the frames are shared out, see above)
    max_extend_frames: int = 8


@dataclass
class AlignedWord:
    word: str
    start: float  # seconds
    end: float
    phonemes: int  # how many of the transcript's phonemes are the word's

    def to_json(self) -> dict:
        return {"word": self.word, "start": round(self.start, 4), "end": round(self.end, 4)}


@dataclass
class Alignment:
    words: list[AlignedWord]
    score: float  # the path's CTC negative log-likelihood less the checker's own best path's, nats per phoneme (0 = as heard)


def word_phonemes(text: str, voice: str = "en-us") -> list[tuple[str, list[str]]]:
    """The words of normalized ``text`` with espeak-ng's phonemes for each as said in the sentence (each word alone when
    espeak's word events cannot be matched to the words); needs espeak-ng."""
    from .training.espeak import Espeak

    spans = word_spans(text)
    espeak = Espeak.instance()
    result = espeak.synthesize(text, voice)
    counts = [len(e.phoneme_starts) for e in result.words]
    if len(counts) == len(spans) and sum(counts) == len(result.phonemes) and all(counts):
        groups, at = [], 0
        for n in counts:
            groups.append(list(result.phonemes[at : at + n]))
            at += n
        return [(w, g) for (w, _, _), g in zip(spans, groups)]
    alone: dict[str, list[str]] = {}
    for w, _, _ in spans:
        if w not in alone:
            alone[w] = espeak.synthesize(w, voice).phonemes
    return [(w, alone[w]) for w, _, _ in spans]


def ctc_viterbi(log_probs: np.ndarray, labels: list[int], blank: int = 0) -> tuple[np.ndarray, float]:
    """The best CTC path of ``labels`` (L,) through ``log_probs`` (F, V): each frame's label index (0..L-1, or -1 for a
    blank), and the path's log-probability. Raises AlignError when the frames cannot hold the labels."""
    F, L = log_probs.shape[0], len(labels)
    ext = np.full(2 * L + 1, blank, dtype=np.int64)
    ext[1::2] = labels
    S = len(ext)
    repeats = sum(1 for a, b in zip(labels, labels[1:]) if a == b)
    if L == 0 or F < L + repeats:
        raise AlignError(f"{L} phonemes do not fit in {F} frames ({F * 0.02:.2f} s) of audio")
    skip = np.zeros(S, dtype=bool)
    skip[3::2] = ext[3::2] != ext[1:-2:2]
    emit = log_probs[:, ext]  # (F, S)
    score = np.full(S, -np.inf)
    score[:2] = emit[0, :2]
    back = np.zeros((F, S), dtype=np.int8)  # 0: stayed, 1: from s - 1, 2: from s - 2
    for t in range(1, F):
        one = np.concatenate([[-np.inf], score[:-1]])
        two = np.where(skip, np.concatenate([[-np.inf, -np.inf], score[:-2]]), -np.inf)
        options = np.stack([score, one, two])
        back[t] = options.argmax(0)
        score = options.max(0) + emit[t]
    s = S - 1 if score[S - 1] >= score[S - 2] else S - 2
    best = float(score[s])
    if not np.isfinite(best):
        raise AlignError("the transcript's phonemes have no path through the audio")
    path = np.empty(F, dtype=np.int64)
    for t in range(F - 1, -1, -1):
        path[t] = s
        s -= int(back[t, s])
    return np.where(path % 2 == 1, path // 2, -1), best


def align_words(audio: np.ndarray, text: str, checker, config: AlignConfig | None = None) -> Alignment:
    """The words of ``text`` (normalized: numbers spelled out, as ``speechlm data synth`` writes them) with their
    start and end in ``audio`` (T,) at 16 kHz, by the pronunciation ``checker`` (a
    :class:`speechlm.checker.PronunciationChecker`). Raises AlignError for a text without words or one whose
    phonemes the audio is too short to hold."""
    config = config or AlignConfig()
    normalized = normalize_text(text)
    words = word_phonemes(normalized, checker.config.voice)
    if not words:
        raise AlignError(f"no words to align in {text!r}")
    if any(not ph for _, ph in words):
        missing = next(w for w, ph in words if not ph)
        raise AlignError(f"espeak-ng gives no phonemes for {missing!r}")
    log_probs = checker.log_probs(np.asarray(audio, np.float32)).float().numpy()
    labels = [i for _, ph in words for i in checker.phoneme_ids(ph)]
    frame_of, log_p = ctc_viterbi(log_probs, labels, blank=checker.index["<blank>"])
    frame_seconds = len(audio) / 16_000 / max(1, log_probs.shape[0])  # 0.02 s
    spans = _word_frames(frame_of, [len(ph) for _, ph in words])
    frames = log_probs.shape[0]
    rms, level = _frame_levels(audio, frames)
    loud = rms > max(config.quiet_rms, config.quiet_share * level)
    sounding = rms > max(config.tail_rms, config.tail_share * level)
    spans = _spread(spans, loud, sounding, config.max_extend_frames)
    aligned = [AlignedWord(w, a * frame_seconds, b * frame_seconds, len(ph)) for (w, ph), (a, b) in zip(words, spans)]
    best = float(log_probs.max(-1).sum())
    return Alignment(aligned, (best - log_p) / len(labels))


def _word_frames(frame_of: np.ndarray, sizes: list[int]) -> list[tuple[int, int]]:
    """Each word's frames [first, last + 1) of its phonemes' path, given each frame's label index (-1 blank) and the words'
    phoneme counts."""
    first = np.full(sum(sizes), -1)
    last = np.full(sum(sizes), -1)
    for t, k in enumerate(frame_of):
        if k >= 0:
            if first[k] < 0:
                first[k] = t
            last[k] = t
    spans, at = [], 0
    for n in sizes:
        spans.append((int(first[at]), int(last[at + n - 1]) + 1))
        at += n
    return spans


def _frame_levels(audio: np.ndarray, frames: int) -> tuple[np.ndarray, float]:
    """Each 20 ms frame's RMS (frames,), and the utterance's loud level (its 90th-percentile frame RMS)."""
    if not frames:
        return np.zeros(0), 0.0
    hop = max(1, len(audio) // frames)
    rms = np.sqrt((np.asarray(audio[: hop * frames], np.float64).reshape(frames, hop) ** 2).mean(1))
    return rms, float(np.percentile(rms, 90))


def _spread(spans: list[tuple[int, int]], loud: np.ndarray, sounding: np.ndarray, most: int) -> list[tuple[int, int]]:
    """Words' phoneme frames widened over the sound beside them: between two words the blank frames go to the word they
    sound with — a quiet run between them (not ``loud``) is the pause, the word before it reaching on over its tail
    (while ``sounding``), the word after it back to where it is loud; with no quiet run they meet halfway. The first word
    reaches back and the last forward over at most ``most`` frames."""
    out = [list(s) for s in spans]
    for i in range(len(out) - 1):
        end, start = out[i][1], out[i + 1][0]
        if start <= end:
            continue
        quiet = np.flatnonzero(~loud[end:start])
        if len(quiet):  # a pause
            begin = end + int(quiet[-1]) + 1
            tail = np.flatnonzero(~sounding[end:begin])
            out[i][1] = end + int(tail[0]) if len(tail) else begin
            out[i + 1][0] = begin
        else:
            mid = (end + start + 1) // 2
            out[i][1], out[i + 1][0] = mid, mid
    first = out[0][0]
    while first > 0 and first > spans[0][0] - most and loud[first - 1]:
        first -= 1
    out[0][0] = first
    last = out[-1][1]
    while last < len(sounding) and last < spans[-1][1] + most and sounding[last]:
        last += 1
    out[-1][1] = last
    return [(a, b) for a, b in out]
