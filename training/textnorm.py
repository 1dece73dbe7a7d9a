"""Text normalisation for speech: spell out numbers, split into spoken words.

Teachers speak the normalised text, and the manifest's ``words`` are exactly the
whitespace tokens of it (punctuation stripped), so word timestamps line up with
what is heard and an ASR target never contains a digit the speaker did not say.
"""

from __future__ import annotations

import itertools
import re
import unicodedata

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
# Abbreviations said as words, and units after a number (singular, plural)
_ABBREVIATIONS_SAID = [(re.compile(rf"\b{re.escape(a)}(?=\s|$)"), said) for a, said in (
    ("Dr.", "Doctor"), ("Mr.", "Mister"), ("Mrs.", "Missus"), ("Prof.", "Professor"), ("Jr.", "Junior"), ("Sr.", "Senior"),
    ("e.g.", "for example"), ("i.e.", "that is"), ("vs.", "versus"), ("etc.", "et cetera."), ("approx.", "approximately"))]
_UNITS = {"km/h": ("kilometer per hour", "kilometers per hour"), "mph": ("mile per hour", "miles per hour"),
          "km": ("kilometer", "kilometers"), "kg": ("kilogram", "kilograms"), "cm": ("centimeter", "centimeters"),
          "mm": ("millimeter", "millimeters"), "°C": ("degree Celsius", "degrees Celsius"),
          "°F": ("degree Fahrenheit", "degrees Fahrenheit"), "°": ("degree", "degrees")}
_MINUS_RE = re.compile(r"(?<![\w.])-(?=\d)")
# A four-digit number from 1100 to 2099 read as a year after a word that asks for one ("in 1913", "since 2007",
# "June 5, 1999"), and a decade ("the 1990s"); elsewhere a number stays a quantity ("I counted 2072 of them")
_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"  # capitalized: "may" is a verb
_YEAR_CONTEXT_RE = re.compile(
    rf"(\b(?:(?i:in|since|by|from|until|till|before|after|of|year|around|circa|during)|{_MONTHS})\s+|\b\d{{1,2}}(?:st|nd|rd|th)?,\s*)"
    r"(1[1-9]|20)(\d{2})\b(?![.,:]?\d)")
_DECADE_RE = re.compile(r"\b(1[1-9]|20)(\d)0s\b")
_MONTH_DAY_RE = re.compile(rf"\b({_MONTHS})\s+([1-9]|[12]\d|3[01])\b(?!:|\.\d)")  # "June 5" -> "June fifth"
_UNIT_RE = re.compile(r"(-?\d+(?:\.\d+)?)\s?(" + "|".join(re.escape(u) for u in _UNITS) + r")(?![^\W\d_])")
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
    """Spell out numbers, times, money, percentages, units after a number (km, kg, °C, ...), a few symbols and
    abbreviations (Dr., e.g., ...); drop emoji; collapse whitespace.

    >>> normalize_text("At 3:05 I paid $12.50 for 2 tickets, 15% off, on the 21st.")
    "At three oh five I paid twelve dollars and fifty cents for two tickets, fifteen percent off, on the twenty first."
    """
    text = _THOUSANDS_RE.sub("", text)
    for pattern, said in _ABBREVIATIONS_SAID:
        text = pattern.sub(said, text)
    text = _UNIT_RE.sub(lambda m: f"{m.group(1)} {_UNITS[m.group(2)][m.group(1) not in ('1', '-1')]}", text)
    text = "".join(c for c in text if unicodedata.category(c) != "So")  # emoji and other pictographs: not said
    text = _MINUS_RE.sub("minus ", text)
    text = _YEAR_CONTEXT_RE.sub(lambda m: m.group(1) + _written_year(int(m.group(2)), int(m.group(3))), text)
    text = _DECADE_RE.sub(lambda m: _plural(_said_year(int(m.group(1)), 10 * int(m.group(2)))), text)
    text = _MONTH_DAY_RE.sub(lambda m: f"{m.group(1)} {ordinal_to_words(int(m.group(2)))}", text)
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


# How digits a listener wrote may have been said (scoring only): a four-digit number from 1100 to 2099 as a year
# ("1913" = "nineteen thirteen"), and hours and minutes written with a dot as a time ("3.30" = "three thirty")
_YEAR_RE = re.compile(r"(?<![\d.,])\b(1[1-9]|20)(\d{2})\b(?![.,]\d)")
_DOT_TIME_RE = re.compile(r"(?<![\d.,])\b([01]?\d|2[0-3])\.([0-5]\d)\b(?![.,]\d)")
MAX_READINGS = 64


def _said_year(high: int, low: int) -> str:
    """A year 1100-2099 as said: (19, 13) -> "nineteen thirteen", (19, 1) -> "nineteen oh one", (19, 0) ->
    "nineteen hundred", (20, 0) -> "two thousand"."""
    if low == 0:
        return "two thousand" if high == 20 else number_to_words(high) + " hundred"
    return number_to_words(high) + (" oh " if low < 10 else " ") + number_to_words(low)


def _written_year(high: int, low: int) -> str:
    """A year written in digits, as most say it: "two thousand seven" (2001-2009), else :func:`_said_year`."""
    return number_to_words(2000 + low) if high == 20 and 0 < low < 10 else _said_year(high, low)


def _plural(words: str) -> str:
    """"nineteen ninety" -> "nineteen nineties", "nineteen hundred" -> "nineteen hundreds"."""
    head, _, last = words.rpartition(" ")
    return f"{head} {last[:-1] + 'ies' if last.endswith('y') else last + 's'}".strip()


def scoring_readings(text: str) -> list[str]:
    """``text`` first, then each way of reading its year-like numbers as years and its dotted times as times
    (every combination; past ``MAX_READINGS`` only all of them read so). A listener such as Whisper writes
    "nineteen thirteen" as "1913" and "three thirty" as "3.30", which :func:`words_for_scoring` alone spells
    "one thousand nine hundred thirteen" and "three point three zero"."""
    spans = sorted([(m.start(), m.end(), _said_year(int(m.group(1)), int(m.group(2)))) for m in _YEAR_RE.finditer(text)]
                   + [(m.start(), m.end(), _time(m)) for m in _DOT_TIME_RE.finditer(text)])
    if 2 ** len(spans) > MAX_READINGS:
        every = [(False,) * len(spans), (True,) * len(spans)]
    else:
        every = list(itertools.product((False, True), repeat=len(spans)))
    readings = []
    for picks in every:
        out, last = [], 0
        for (a, b, spoken), pick in zip(spans, picks):
            out += [text[last:a], spoken if pick else text[a:b]]
            last = b
        readings.append("".join([*out, text[last:]]))
    return readings


# A sentence ends at . ! or ? (closing quotes or brackets may follow) before a space and a capital, a digit
# or an opening quote; not after a title or an initial ("Dr. Smith", "J. K. Rowling").
_SENTENCE_END_RE = re.compile(r"([.!?]+[\"'”’)\]]*)\s+(?=[\"'“‘(\[]?[A-Z0-9])")
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "prof", "sr", "jr", "vs", "mt", "ft", "e.g", "i.e", "approx"}


# Where split_clauses cuts a sentence that is too long: after every clause mark (, ; : followed by a space, or a
# dash with spaces around it) and a conjunction right after it, then, in a clause still too long, after as few
# conjunctions as it takes. A conjunction ends its part: the shipped model, which never saw a sentence start with
# one, spoke clauses starting with "And" at 69 % judge WER and the same words with the "and" ending the clause
# before at 41 % (validation-split long sentences).
_CONJUNCTIONS = "and|but|or|so|because|then|while|which|who|where|when|until|although"
_CLAUSE_MARK_RE = re.compile(rf"(?:[,;:]|\s[-–—]+)\s+(?:(?:{_CONJUNCTIONS})\b\s*)?", re.IGNORECASE)
_CONJUNCTION_RE = re.compile(rf"\b(?:{_CONJUNCTIONS})\s+", re.IGNORECASE)
_TRAILING_MARKS_RE = re.compile(r"[\s,;:\-–—]+$")
_MARK_BEFORE_CONJUNCTION_RE = re.compile(rf"[\s,;:\-–—]+\s((?:{_CONJUNCTIONS}))$", re.IGNORECASE)
MIN_CLAUSE_WORDS = 3  # a shorter clause ("please", "Monday") stays with the one before (the first: the next)


def split_clauses(sentence: str, max_words: int) -> list[str]:
    """``sentence`` in parts of at most ``max_words`` spoken words (numbers spelled out), for a speaker that
    learned single sentences no longer than that: a sentence that is too long is cut after every clause mark
    and the conjunction right after it (``, and``; a clause of fewer than ``MIN_CLAUSE_WORDS`` words kept with
    the one before); a clause still too long is cut after as few of its conjunctions as it takes, and what is
    still too long into runs of words of near-equal length. A part before the last ends with a full stop instead
    of its mark ("…, and" -> "… and."), and a part after the first starts with a capital. A sentence that fits
    (or ``max_words`` <= 0): ``[sentence]``."""
    sentence = sentence.strip()
    if max_words <= 0 or _count_words(sentence) <= max_words:
        return [sentence]
    cuts = [0, *(m.end() for m in _CLAUSE_MARK_RE.finditer(sentence)), len(sentence)]
    clauses: list[str] = []
    carry = ""  # a short first clause, waiting for the next
    for a, b in zip(cuts, cuts[1:]):
        clause, carry = carry + sentence[a:b], ""
        if _count_words(clause) >= MIN_CLAUSE_WORDS:
            clauses.append(clause)
        elif clauses:
            clauses[-1] += clause
        else:
            carry = clause
    parts = [p.strip() for c in clauses or [carry] for p in _fewest_parts(c, max_words)]
    parts = [p for p in parts if _count_words(p)]
    out = []
    for k, part in enumerate(parts):
        part = part[:1].upper() + part[1:] if k else part
        out.append(part if k == len(parts) - 1 else _MARK_BEFORE_CONJUNCTION_RE.sub(r" \1", _TRAILING_MARKS_RE.sub("", part)) + ".")
    return out


def _count_words(text: str) -> int:
    return len(spoken_words(normalize_text(text)))


def _fewest_parts(text: str, max_words: int) -> list[str]:
    """``text`` cut after its conjunctions, neighbours joined again while they fit in ``max_words`` spoken
    words; a part still too long in runs of words (:func:`_runs_of_words`)."""
    if _count_words(text) <= max_words:
        return [text]
    cuts = [0, *(m.end() for m in _CONJUNCTION_RE.finditer(text)), len(text)]
    parts: list[str] = []
    current = ""
    for a, b in zip(cuts, cuts[1:]):
        if current and _count_words(current + text[a:b]) > max_words:
            parts.append(current)
            current = ""
        current += text[a:b]
    return [run for part in [*parts, current] for run in _runs_of_words(part, max_words)]


def _runs_of_words(text: str, max_words: int) -> list[str]:
    """``text`` cut between its words into the fewest runs of at most ``max_words`` spoken words, the longest
    run as short as can be (a single word longer than that is a run of its own)."""
    words = text.split()
    sizes = [_count_words(w) for w in words]

    def runs(cap: int) -> list[list[str]]:
        out: list[list[str]] = [[]]
        size = 0
        for word, n in zip(words, sizes):
            if out[-1] and size + n > cap:
                out.append([])
                size = 0
            out[-1].append(word)
            size += n
        return out

    fewest = len(runs(max_words))
    even = min(max_words, max(1, -(-sum(sizes) // fewest)))
    cap = next(c for c in range(even, max_words + 1) if len(runs(c)) <= fewest)
    return [" ".join(run) for run in runs(cap)]


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
