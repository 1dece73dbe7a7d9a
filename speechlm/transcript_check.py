"""Checking a transcript against the sounds: the LM's ASR corrected word by word with the checker's ear.

The speech LM transcribes through a strong prior: a held-out question of a familiar shape comes out
as a training question of that shape, its content word swapped ("What does a snake say?" -> "What
does a duck say?", "Which city is the capital of Sweden?" -> "... of Chile?"), although the words
it needs are words it knows. The pronunciation checker (``speechlm.checker``, a CTC phoneme
recognizer with no language model) hears the sounds, not the words it expects: the CTC likelihood of
the right sentence's phonemes is far higher than the LM's transcript's. :func:`check_transcript`
searches the one-word edits of the transcript over a lexicon (the words of the model's training
texts, with their espeak-ng phonemes) and keeps an edit when it lowers::

    J(h) = NLL_checker(phonemes(h) | audio) - lm_weight * log p_LM(h | audio)

(both in nats; the LM term keeps the sentence well formed, the checker term keeps it what was said).
Each round scores every edit by the checker (the edits' CTC likelihoods spliced from one pass over the
current transcript, :mod:`speechlm.ctc_edits`: the same figures as a CTC over each whole edit, ~5x
faster), the ``shortlist`` best by the LM
(teacher forced, one batch), and takes the best if it lowers J by more than ``margin``; at most
``rounds`` edits. A transcript of more than ``max_words`` words is kept as it is (the edits grow with its
words and the CTC with the audio's length: a 12 s LibriSpeech utterance takes ~4 s more on one thread,
and read speech is not what the lexicon's words are for), and so is one whose phonemes are far fewer or
more than the checker reads in the audio (the LM's short synthetic-style guess at 12 s of read speech).
A transcript the checker already hears as said (its CTC NLL within ``skip_gap`` nats per phoneme of the
checker's own best path) is kept without a search: on 60 validation-split utterances by held-out
voices, 14 of the 45 right transcripts and none of the 15 wrong ones were within 1.0.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .codec.errors import SpeechLMError

LEXICON_FILE = "lexicon.json"
_TOKEN_RE = re.compile(r"^([^\w']*)((?:[^\W\d_]|')+)([^\w']*)$")  # punctuation, a word of letters, punctuation


@dataclass
class Lexicon:
    """Words (as written, e.g. ``Sweden``, ``snake``) and their phonemes (espeak-ng IPA)."""

    phonemes: dict[str, list[str]]
    voice: str = "en-us"

    def __len__(self) -> int:
        return len(self.phonemes)

    @property
    def words(self) -> list[str]:
        return list(self.phonemes)

    @cached_property
    def written(self) -> dict[str, str]:
        """lower-cased word -> the lexicon's written form (``sweden`` -> ``Sweden``)."""
        return {w.lower(): w for w in self.phonemes}

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        lines = ",\n".join(f"  {json.dumps(w, ensure_ascii=False)}: {json.dumps(p, ensure_ascii=False)}" for w, p in self.phonemes.items())
        path.write_text(f'{{"voice": {json.dumps(self.voice)}, "phonemes": {{\n{lines}\n}}}}\n', encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Lexicon:
        path = Path(path)
        if not path.is_file():
            raise SpeechLMError(f"no lexicon at {path} (build one with `speechlm data lexicon`)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(phonemes={str(w): [str(x) for x in p] for w, p in data["phonemes"].items()}, voice=str(data.get("voice", "en-us")))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise SpeechLMError(f"{path} is not a lexicon file (a JSON object with 'phonemes': {{word: [phoneme, ...]}})") from None


def lexicon_words(texts: Iterable[str]) -> list[str]:
    """The distinct words of ``texts`` (normalized: numbers spelled out), each in its most common written
    form away from a sentence's start (``Sweden``, ``snake``), in first-seen order."""
    from .training.textnorm import normalize_text

    forms: dict[str, Counter] = {}
    for text in texts:
        starts = True
        for token in normalize_text(text).split():
            m = _TOKEN_RE.match(token)
            if m:
                word = m.group(2)
                counts = forms.setdefault(word.lower(), Counter())
                counts[word] += 0 if starts else 1  # a sentence's first word counts only to be listed
            starts = token[-1:] in ".?!"
    # a word seen only at a sentence's start is written in lower case (``Which`` -> ``which``), but for "I"
    return [max(c, key=lambda w: (c[w], w.islower())) if c.total() or _is_i(next(iter(c))) else next(iter(c)).lower()
            for c in forms.values()]


def _is_i(word: str) -> bool:
    return word == "I" or word.startswith("I'")


def build_lexicon(texts: Iterable[str], voice: str = "en-us", phonemize: Callable[[str], list[str]] | None = None,
                  per_word: int = 3) -> Lexicon:
    """A :class:`Lexicon` of the words of ``texts``. Each word's phonemes are those espeak-ng ``voice`` says
    for it inside sentences of ``texts`` (the most common of its first ``per_word`` sentences: a sentence's
    "a" is [ɐ], alone it is [eɪ]); needs espeak-ng. ``phonemize(word)`` instead: each word alone."""
    from .training.textnorm import normalize_text

    texts = list(texts)
    words = lexicon_words(texts)
    if phonemize is not None:
        return Lexicon(phonemes={w: phonemize(w) for w in words}, voice=voice)
    from .training.espeak import Espeak

    espeak = Espeak.instance()
    heard: dict[str, Counter] = {w.lower(): Counter() for w in words}
    for text in texts:
        text = normalize_text(text)
        spans = [(m.start(), m.end(), _TOKEN_RE.match(m.group())) for m in re.finditer(r"\S+", text)]
        wanted = [m.group(2).lower() for _, _, m in spans if m and sum(heard[m.group(2).lower()].values()) < per_word]
        if not wanted:
            continue
        result = espeak.synthesize(text, voice)
        said: dict[int, list[str]] = {}  # token index -> its phonemes
        at = 0
        for event in result.words:
            token = next((i for i, (a, b, _) in enumerate(spans) if a <= event.text_position < b), None)
            count = len(event.phoneme_starts)
            if token is not None:
                said.setdefault(token, []).extend(result.phonemes[at : at + count])
            at += count
        for i, (_, _, m) in enumerate(spans):
            if m and i in said and said[i] and sum(heard[m.group(2).lower()].values()) < per_word:
                heard[m.group(2).lower()][tuple(said[i])] += 1
    phonemes = {}
    for w in words:
        counts = heard[w.lower()]
        phonemes[w] = list(counts.most_common(1)[0][0]) if counts else espeak.synthesize(w, voice).phonemes
    return Lexicon(phonemes=phonemes, voice=voice)


@dataclass
class _Token:
    before: str
    word: str
    after: str

    def text(self) -> str:
        return self.before + self.word + self.after


def _tokens(transcript: str) -> list[_Token] | None:
    """Whitespace tokens as (leading punctuation, word, trailing punctuation); None if any token is not
    one word (digits, symbols), which the search leaves alone."""
    out = []
    for token in transcript.split():
        m = _TOKEN_RE.match(token)
        if not m:
            return None
        out.append(_Token(*m.groups()))
    return out


def _cased(word: str, first: bool) -> str:
    return word[:1].upper() + word[1:] if first else word


# A transcript one word away, (start, end, new): the original's tokens[start:end] replaced by the
# tokens ``new`` (a word's neighbour whose case or punctuation moves is part of the span).
_Edit = tuple[int, int, tuple[_Token, ...]]


def _apply(tokens: Sequence[_Token], edit: _Edit) -> list[_Token]:
    start, end, new = edit
    return [*tokens[:start], *new, *tokens[end:]]


def edits(tokens: list[_Token], lexicon: Lexicon) -> list[list[_Token]]:
    """Every transcript one word away: each word replaced by each lexicon word, each word dropped, and
    each lexicon word put in before each word or at the end (a sentence's first word capitalized, the
    punctuation kept where it was), each distinct text once."""
    made = [_apply(tokens, e) for e in _edits(tokens, lexicon)]
    return list({text_of(e): e for e in reversed(made)}.values())[::-1]  # each text once, in first-made order


def _edits(tokens: list[_Token], lexicon: Lexicon) -> list[_Edit]:
    """:func:`edits` as spans, in the same order; a text may come more than once ("what" put in before or
    after "What")."""
    words = lexicon.words
    plain = [(_Token("", w, ""),) for w in words]  # a word mid-sentence, shared by the edits that put it there
    out: list[_Edit] = []
    n = len(tokens)
    for j, t in enumerate(tokens):
        lower = t.word.lower()
        bare = j > 0 and not t.before and not t.after
        for w, alone in zip(words, plain):
            if w.lower() != lower:
                out.append((j, j + 1, alone if bare else (_Token(t.before, _cased(w, j == 0), t.after),)))
        if n > 1:
            if j == 0:
                nxt = tokens[1]
                out.append((0, 2, (_Token(t.before + nxt.before, _cased(nxt.word, True), nxt.after),)))
            elif j == n - 1:
                prev = tokens[-2]
                out.append((n - 2, n, (_Token(prev.before, prev.word, prev.after + t.after),)))
            else:
                out.append((j, j + 1, ()))
    first, last = tokens[0], tokens[-1]
    lowered = _Token("", first.word if first.word.isupper() or first.word[:1].islower() else _lower_first(first.word, lexicon), first.after)
    bare_last = _Token(last.before, last.word, "")
    for j in range(n + 1):
        for w, alone in zip(words, plain):
            if j == 0:
                out.append((0, 1, (_Token(first.before, _cased(w, True), ""), lowered)))
            elif j == n:
                out.append((n - 1, n, (bare_last, _Token("", w, last.after))))
            else:
                out.append((j, j, alone))
    return out


class _WordPhonemes:
    """A word token's phonemes (a tuple): the lexicon's (the word as written, else as written
    mid-sentence), else ``phonemize(word)``, each word looked up once."""

    def __init__(self, lexicon: Lexicon, phonemize: Callable[[str], list[str]]):
        self.lexicon, self.phonemize, self.cache = lexicon, phonemize, {}

    def __call__(self, token: _Token) -> tuple[str, ...]:
        word = token.word
        if word not in self.cache:
            ph = self.lexicon.phonemes
            key = word if word in ph else _lower_first(word, self.lexicon)
            self.cache[word] = tuple(ph[key] if key in ph else self.phonemize(word))
        return self.cache[word]

    def of(self, tokens: Sequence[_Token]) -> list[str]:
        return [p for t in tokens for p in self(t)]


def edit_splices(tokens: Sequence[_Token], candidates: Sequence[_Edit], phonemes: _WordPhonemes) -> list[tuple[int, tuple[str, ...], int]]:
    """Each candidate's phonemes as (a, middle, b): the original's first a phonemes, ``middle``, its last b."""
    bounds = [0]
    for t in tokens:
        bounds.append(bounds[-1] + len(phonemes(t)))
    total = bounds[-1]
    out = []
    for start, end, new in candidates:
        middle = phonemes(new[0]) if len(new) == 1 else tuple(p for t in new for p in phonemes(t))
        out.append((bounds[start], middle, total - bounds[end]))
    return out


def _lower_first(word: str, lexicon: Lexicon) -> str:
    """A sentence's first word as written mid-sentence: the lexicon's form (``Ben`` stays, ``What`` -> ``what``)."""
    return lexicon.written.get(word.lower(), word.lower())


def text_of(tokens: Sequence[_Token]) -> str:
    return " ".join(t.text() for t in tokens)


def check_transcript(
    transcript: str,
    lexicon: Lexicon,
    acoustic: Callable[[list[list[str]]], list[float]],
    lm_log_prob: Callable[[list[str]], list[float]],
    phonemize: Callable[[str], list[str]],
    *,
    best_path_nll: float,
    lm_weight: float = 1.0,
    shortlist: int = 16,
    rounds: int = 3,
    margin: float = 0.0,
    skip_gap: float = 1.0,
    max_words: int = 24,
    heard_phonemes: int | None = None,
    max_length_ratio: float = 2.0,
    acoustic_edits: Callable[[list[str], list[tuple[int, Sequence[str], int]]], list[float]] | None = None,
) -> str:
    """The transcript after at most ``rounds`` one-word edits that lower J (module doc).

    ``acoustic(phoneme lists)`` -> the checker's CTC NLL of each (nats, whole utterance);
    ``lm_log_prob(texts)`` -> log p_LM(text | audio) of each; ``phonemize(word)`` -> phonemes of a word
    not in the lexicon; ``best_path_nll``: the NLL of the checker's own best path (for ``skip_gap``);
    ``heard_phonemes``: how many phonemes the checker reads in the audio (greedy) — a transcript with more than
    ``max_length_ratio`` times as many or as few phonemes is kept as it is. ``acoustic_edits(reference,
    [(a, middle, b), ...])``, if given, scores the phoneme lists ``reference[:a] + middle + reference[-b:]``
    as ``acoustic`` would, faster (:func:`speechlm.ctc_edits.edit_nlls`): each round's candidates are
    passed to it as splices of the current transcript's phonemes."""
    if lm_weight < 0:
        raise SpeechLMError(f"the transcript check's LM weight must be >= 0, got {lm_weight}")
    tokens = _tokens(transcript)
    if not tokens or not lexicon.phonemes or len(tokens) > max_words:
        return transcript
    phonemes = _WordPhonemes(lexicon, phonemize)
    current_ph = phonemes.of(tokens)
    if not current_ph:
        return transcript
    if heard_phonemes is not None and not 1 / max_length_ratio <= heard_phonemes / len(current_ph) <= max_length_ratio:
        return transcript  # the transcript does not cover what was said (or says far more): a few edits cannot fix it
    current_ac = acoustic([current_ph])[0]
    if (current_ac - best_path_nll) / len(current_ph) < skip_gap:
        return transcript
    current: float | None = None  # J of the transcript: its LM term comes with the first round's shortlist
    for _ in range(rounds):
        candidates = _edits(tokens, lexicon)
        splices = edit_splices(tokens, candidates, phonemes)
        L = len(current_ph)
        keep = [i for i, (a, m, b) in enumerate(splices) if a + len(m) + b]
        if acoustic_edits is None:
            scores = acoustic([current_ph[:a] + list(m) + current_ph[L - b :] for a, m, b in (splices[i] for i in keep)])
        else:
            scores = acoustic_edits(current_ph, [splices[i] for i in keep])
        # The shortlist: the best distinct texts by the checker. log p_LM <= 0, so J >= the checker's NLL:
        # an edit whose NLL alone does not beat J cannot win.
        bound = float("inf") if current is None else current - margin
        shortlisted: dict[str, tuple[float, list[_Token]]] = {}
        for i in sorted(range(len(keep)), key=scores.__getitem__):
            if len(shortlisted) == shortlist or scores[i] >= bound:
                break
            edited = _apply(tokens, candidates[keep[i]])
            shortlisted.setdefault(text_of(edited), (scores[i], edited))
        texts = list(shortlisted)
        if current is None:
            lm = lm_log_prob([text_of(tokens), *texts])
            current, lm = current_ac - lm_weight * lm[0], lm[1:]
        elif texts:
            lm = lm_log_prob(texts)
        if not texts:
            break
        joint = [shortlisted[t][0] - lm_weight * p for t, p in zip(texts, lm)]
        best = min(range(len(joint)), key=joint.__getitem__)
        if joint[best] >= current - margin:
            break
        tokens, current = shortlisted[texts[best]][1], joint[best]
        current_ph = phonemes.of(tokens)
    return text_of(tokens)
