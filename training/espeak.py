"""ctypes binding to libespeak-ng: synthesis with word and phoneme events.

The command-line ``espeak-ng`` prints no timing, so we call the library directly:
in synchronous mode it hands us PCM chunks plus events, where every WORD event
carries the sample at which the word starts and PHONEME events with an empty
name mark pauses.  That gives word timestamps straight from the synthesizer.

libespeak-ng keeps global state and is not thread safe: use one instance per
process (``Espeak.instance()``); parallel synthesis uses processes.

That state also carries over from one utterance to the next (the wave generator's
buffers, its noise from C ``rand()``): synthesized in one process, the same text
comes out a few samples longer or shorter depending on what was said before.  So
each utterance is synthesized in a forked child of the initialised library, which
is never used for synthesis itself, with ``rand()`` seeded from the request: the
same text, voice, rate and pitch give the same samples whatever came before
(``isolated=False`` synthesizes in this process, as on systems without ``fork``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import pickle
import zlib
from dataclasses import dataclass, field

import numpy as np

from ..codec.errors import DependencyError, SpeechLMError

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INIT_PHONEME_EVENTS = 0x0001
_INIT_PHONEME_IPA = 0x0002
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EVENT_LIST_TERMINATED = 0
_EVENT_WORD = 1
_EVENT_PHONEME = 7
# espeak_SetParameter ids
_PARAM_RATE = 1
_PARAM_VOLUME = 2
_PARAM_PITCH = 3
_PARAM_RANGE = 4

INSTALL_HINT = "install it with: apt-get install espeak-ng"


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),
    ]


class _Voice(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_void_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@dataclass
class EspeakWordEvent:
    text_position: int  # 0-based character offset of the word in the input text
    start: int  # sample index where the word starts
    end: int  # sample index where its last phoneme ends
    phoneme_starts: list[int]  # sample index of each (named) phoneme of the word


@dataclass
class EspeakResult:
    audio: np.ndarray  # (T,) float32 at ``sample_rate``
    sample_rate: int
    words: list[EspeakWordEvent]
    phonemes: list[str] = field(default_factory=list)  # the IPA phonemes spoken, in order (pauses left out)


def find_library() -> str:
    """Path or name of libespeak-ng; ``SPEECHLM_ESPEAK_LIBRARY`` overrides the search."""
    override = os.environ.get("SPEECHLM_ESPEAK_LIBRARY")
    if override:
        return override
    return ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"


class Espeak:
    """One initialised libespeak-ng (per process)."""

    _instance: Espeak | None = None

    @classmethod
    def instance(cls) -> Espeak:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def __init__(self) -> None:
        path = find_library()
        try:
            self._lib = ctypes.CDLL(path)
        except OSError:
            raise DependencyError(f"espeak-ng is not installed (cannot load {path}); {INSTALL_HINT}") from None
        self._lib.espeak_Initialize.restype = ctypes.c_int
        self.sample_rate = self._lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, None, _INIT_PHONEME_EVENTS | _INIT_PHONEME_IPA
        )
        if self.sample_rate <= 0:
            raise DependencyError(f"espeak-ng failed to initialise (no espeak-ng-data?); {INSTALL_HINT}")
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int, int, bytes]] = []
        self._callback = _Callback(self._on_synth)  # keep a reference: ctypes does not
        self._lib.espeak_SetSynthCallback(self._callback)
        self._voice: str | None = None
        self._variants: set[str] | None = None
        self.languages = self._language_table()

    def _language_table(self) -> dict[str, str]:
        """language code (``en-gb``) -> voice file identifier (``gmw/en``), best priority first.

        ``espeak_SetVoiceByName`` wants file names, while people write language codes
        (as the ``espeak-ng -v`` command does); mbrola voices are skipped (not installed).
        """
        self._lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
        voices = self._lib.espeak_ListVoices(None)
        best: dict[str, tuple[int, str]] = {}
        i = 0
        while voices[i]:
            v = voices[i].contents
            ident = (v.identifier or b"").decode()
            i += 1
            if not ident or ident.startswith("mb/") or not v.languages:
                continue
            raw = ctypes.string_at(v.languages, 512)
            pos = 0
            while pos < len(raw) and raw[pos] != 0:
                priority = raw[pos]
                end = raw.index(b"\0", pos + 1)
                lang = raw[pos + 1 : end].decode(errors="replace")
                if lang not in best or priority < best[lang][0]:
                    best[lang] = (priority, ident)
                pos = end + 1
        return {lang: ident for lang, (_, ident) in best.items()}

    def _on_synth(self, wav, num_samples, events) -> int:
        if num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            e = events[i]
            if e.type in (_EVENT_WORD, _EVENT_PHONEME):
                self._events.append((e.type, e.text_position, e.sample, bytes(e.id).split(b"\0")[0]))
            i += 1
        return 0

    def check_voice(self, name: str) -> None:
        """Raise SpeechLMError unless ``name`` (``en-us``, ``en-gb+f3``) is a voice this espeak-ng has, without
        selecting it: selecting voices changes the library's state, which the forked synthesis relies on being
        the same for every utterance (a run of variant selections changed how later text was split into words)."""
        language, _, variant = name.partition("+")
        known = language in self.languages or language in self.languages.values()
        if not known or (variant and variant not in self.variants):
            raise SpeechLMError(f"unknown espeak-ng voice {name!r} (see: espeak-ng --voices=en; variants: espeak-ng --voices=variant)")

    @property
    def variants(self) -> set[str]:
        """The voice variants (``m3``, ``f4``, ``klatt``, ``Annie``...) espeak-ng lists."""
        if self._variants is None:
            spec = _Voice()
            spec.languages = ctypes.cast(ctypes.c_char_p(b"variant"), ctypes.c_void_p)
            voices = self._lib.espeak_ListVoices(ctypes.byref(spec))
            found, i = set(), 0
            while voices[i]:
                ident = (voices[i].contents.identifier or b"").decode()
                found.add(ident.rsplit("/", 1)[-1])
                i += 1
            self._variants = found
        return self._variants

    def set_voice(self, name: str) -> None:
        """Select a voice such as ``en-us`` or ``en-gb+f3`` (language + variant)."""
        if name == self._voice:
            return
        language, plus, variant = name.partition("+")
        resolved = self.languages.get(language, language) + plus + variant
        if self._lib.espeak_SetVoiceByName(resolved.encode()) != 0:
            raise SpeechLMError(f"unknown espeak-ng voice {name!r} (see: espeak-ng --voices=en; variants: espeak-ng --voices=variant)")
        self._voice = name

    def synthesize(
        self, text: str, voice: str, rate: int = 175, pitch: int = 50, pitch_range: int = 50, isolated: bool = True
    ) -> EspeakResult:
        """Speak ``text``; rate in words per minute, pitch and range 0-100.

        ``isolated`` (the default where ``os.fork`` exists) synthesizes in a forked child
        so that the result depends only on the arguments (module docstring).
        """
        if isolated and hasattr(os, "fork"):
            return self._synthesize_forked(text, voice, rate, pitch, pitch_range)
        return self._synthesize_here(text, voice, rate, pitch, pitch_range)

    def _synthesize_forked(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int) -> EspeakResult:
        self.check_voice(voice)  # unknown voices fail here; this process never selects one (see check_voice)
        seed = zlib.crc32(f"{voice}|{rate}|{pitch}|{pitch_range}|{text}".encode()) or 1
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: synthesize from the parent's untouched state, send the result, leave
            status = 0
            try:
                os.close(read_fd)
                ctypes.CDLL(None).srand(ctypes.c_uint(seed))
                self._voice = None  # select the voice again in this state
                try:
                    reply: object = self._synthesize_here(text, voice, rate, pitch, pitch_range)
                except SpeechLMError as e:
                    reply = e
                with os.fdopen(write_fd, "wb") as pipe:
                    pipe.write(pickle.dumps(reply))
            except BaseException:
                status = 1
            finally:
                os._exit(status)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
        if status != 0 or not data:
            raise SpeechLMError(f"espeak-ng synthesis failed in its child process (wait status {status})")
        reply = pickle.loads(data)
        if isinstance(reply, SpeechLMError):
            raise reply
        return reply

    def _synthesize_here(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int) -> EspeakResult:
        self.set_voice(voice)
        for param, value in ((_PARAM_RATE, rate), (_PARAM_PITCH, pitch), (_PARAM_RANGE, pitch_range), (_PARAM_VOLUME, 100)):
            self._lib.espeak_SetParameter(param, int(value), 0)
        self._chunks, self._events = [], []
        data = text.encode("utf-8")
        err = self._lib.espeak_Synth(ctypes.c_char_p(data), len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if err != 0:
            raise SpeechLMError(f"espeak-ng synthesis failed (error {err})")
        self._lib.espeak_Synchronize()
        audio = np.concatenate(self._chunks).astype(np.float32) / 32768.0 if self._chunks else np.zeros(0, np.float32)
        phonemes = [name.decode("utf-8", "replace") for kind, _, _, name in self._events if kind == _EVENT_PHONEME and name]
        return EspeakResult(audio=audio, sample_rate=self.sample_rate, words=_word_events(self._events, len(audio)), phonemes=phonemes)


def _word_events(events: list[tuple[int, int, int, bytes]], num_samples: int) -> list[EspeakWordEvent]:
    """Turn the raw event stream into word spans.

    A word starts at its WORD event; it ends where its last named phoneme ends, i.e.
    at the next event after that phoneme (a pause marker, the next word, or the end).
    """
    words: list[EspeakWordEvent] = []
    for k, (kind, pos, sample, _) in enumerate(events):
        if kind != _EVENT_WORD:
            continue
        end = None
        phonemes: list[int] = []
        for kind2, _, sample2, name2 in events[k + 1 :]:
            if kind2 == _EVENT_WORD:
                end = sample2 if end is None else end
                break
            if kind2 == _EVENT_PHONEME and end is None:
                if name2:
                    phonemes.append(sample2)
                elif phonemes and sample2 > sample:
                    end = sample2
        end = min(end if end is not None else num_samples, num_samples)
        words.append(EspeakWordEvent(text_position=pos - 1, start=sample, end=end, phoneme_starts=phonemes))
    return words
