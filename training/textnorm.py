"""Text normalisation for speech: spell out numbers, split into spoken words.

Teachers speak the normalised text, and the manifest's ``words`` are exactly the
whitespace tokens of it (punctuation stripped), so word timestamps line up with
what is heard and an ASR target never contains a digit the speaker did not say.
"""

from __future__ import annotations

import re

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = [(10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand")]
_ORDINAL_IRREGULAR = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth", "nine": "ninth", "twelve": "twelfth"}


def number_to_words(n: int) -> str:
    """``412 -> 'four hundred twelve'``; negative numbers get 'minus'."""
    if n < 0:
        return "minus " + number_to_words(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return _ONES[hundreds] + " hundred" + ("" if rest == 0 else " " + number_to_words(rest))
    for scale, name in _SCALES:
        if n >= scale:
            head, rest = divmod(n, scale)
            return number_to_words(head) + " " + name + ("" if rest == 0 else " " + number_to_words(rest))
    raise AssertionError("unreachable")


def ordinal_to_words(n: int) -> str:
    """``3 -> 'third'``, ``21 -> 'twenty first'``, ``40 -> 'fortieth'``."""
    words = number_to_words(n).split()
    last = words[-1]
    if last in _ORDINAL_IRREGULAR:
        last = _ORDINAL_IRREGULAR[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last = last + "th"
    return " ".join(words[:-1] + [last])


_ORDINAL_RE = re.compile(r"\b(\d+)(st|nd|rd|th)\b", re.IGNORECASE)
_TIME_RE = re.compile(r"\b(\d{1,2}):(\d{2})\b")
_MONEY_RE = re.compile(r"\$(\d+)(?:\.(\d{2}))?")
_PERCENT_RE = re.compile(r"(\d+(?:\.\d+)?)\s?%")
_DECIMAL_RE = re.compile(r"\b(\d+)\.(\d+)\b")
_INT_RE = re.compile(r"\b\d+\b")
_SYMBOLS = {"&": " and ", "+": " plus ", "=": " equals ", "@": " at "}
_SPACE_RE = re.compile(r"\s+")
# A spoken word: letters and digits with inner apostrophes ("don't").
_WORD_RE = re.compile(r"[^\W_]+(?:['’][^\W_]+)*", re.UNICODE)


def _time(m: re.Match) -> str:
    hours, minutes = int(m.group(1)), int(m.group(2))
    if minutes == 0:
        return number_to_words(hours) + " o'clock"
    if minutes < 10:
        return number_to_words(hours) + " oh " + number_to_words(minutes)
    return number_to_words(hours) + " " + number_to_words(minutes)


def _money(m: re.Match) -> str:
    dollars = int(m.group(1))
    out = number_to_words(dollars) + (" dollar" if dollars == 1 else " dollars")
    if m.group(2) and int(m.group(2)):
        cents = int(m.group(2))
        out += " and " + number_to_words(cents) + (" cent" if cents == 1 else " cents")
    return out


_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}\b)")
_HYPHEN_RE = re.compile(r"(?<=\w)[-‐–](?=\w)")


def normalize_text(text: str) -> str:
    """Spell out numbers, times, money, percentages and a few symbols; collapse whitespace.

    >>> normalize_text("At 3:05 I paid $12.50 for 2 tickets, 15% off, on the 21st.")
    "At three oh five I paid twelve dollars and fifty cents for two tickets, fifteen percent off, on the twenty first."
    """
    text = _THOUSANDS_RE.sub("", text)
    text = _HYPHEN_RE.sub(" ", text)
    text = _TIME_RE.sub(_time, text)
    text = _MONEY_RE.sub(_money, text)
    text = _PERCENT_RE.sub(lambda m: m.group(1) + " percent", text)
    text = _ORDINAL_RE.sub(lambda m: ordinal_to_words(int(m.group(1))), text)
    text = _DECIMAL_RE.sub(
        lambda m: number_to_words(int(m.group(1))) + " point " + " ".join(_ONES[int(d)] for d in m.group(2)), text
    )
    text = _INT_RE.sub(lambda m: number_to_words(int(m.group(0))), text)
    for symbol, spoken in _SYMBOLS.items():
        text = text.replace(symbol, spoken)
    return _SPACE_RE.sub(" ", text).strip()


def spoken_words(text: str) -> list[str]:
    """The words of already-normalised ``text`` in order, punctuation stripped."""
    return [m.group(0) for m in _WORD_RE.finditer(text)]


def word_spans(text: str) -> list[tuple[str, int, int]]:
    """``(word, start_char, end_char)`` for each word of ``text`` (0-based, end exclusive)."""
    return [(m.group(0), m.start(), m.end()) for m in _WORD_RE.finditer(text)]


def words_for_scoring(text: str) -> list[str]:
    """Lower-cased, number-spelled words, for WER and answer checks."""
    return [w.lower().replace("’", "'") for w in spoken_words(normalize_text(text))]


# A sentence ends at . ! or ? (closing quotes or brackets may follow) before a space and a capital, a digit
# or an opening quote; not after a title or an initial ("Dr. Smith", "J. K. Rowling").
_SENTENCE_END_RE = re.compile(r"([.!?]+[\"'”’)\]]*)\s+(?=[\"'“‘(\[]?[A-Z0-9])")
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "prof", "sr", "jr", "vs", "mt", "ft", "e.g", "i.e", "approx"}


def split_sentences(text: str) -> list[str]:
    """``text`` as its sentences (each line apart, then at sentence ends); blank ones dropped."""
    out = []
    for line in text.splitlines():
        start = 0
        for m in _SENTENCE_END_RE.finditer(line):
            words = line[start : m.start(1)].split()
            last = words[-1].lower() if words else ""
            if m.group(1)[0] == "." and (last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha())):
                continue
            out.append(line[start : m.end(1)].strip())
            start = m.end()
        out.append(line[start:].strip())
    return [s for s in out if s]
