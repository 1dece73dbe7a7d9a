"""Built-in text sources for synthetic speech, with deterministic held-out splits.

Each source is a generator of *items* (dicts with at least ``text``; QA sources add
``answer``; dialogues add ``turns``).  Every item belongs to a split decided by a
stable hash of its normalised text, so a sentence never changes sides between runs
and "unseen text" means the same thing to every later benchmark.

Voices are split the same way (:func:`voice_split`): a fixed list of espeak-ng
variants is held out of training, so benchmarks can report on unseen voices.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

from .textnorm import normalize_text, number_to_words, ordinal_to_words, split_sentences

SPLITS = ("train", "valid", "test")
# Percent of the hash space given to each held-out split.
_HELDOUT_PERCENT = {"valid": 5, "test": 10}


def stable_hash(text: str) -> int:
    """A hash of ``text`` that is the same on every machine and Python run."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")


def text_split(text: str) -> str:
    """'train', 'valid' or 'test' for a text (by hash of its lower-cased normalised form)."""
    bucket = stable_hash(normalize_text(text).lower()) % 100
    if bucket < _HELDOUT_PERCENT["test"]:
        return "test"
    if bucket < _HELDOUT_PERCENT["test"] + _HELDOUT_PERCENT["valid"]:
        return "valid"
    return "train"


# espeak-ng variants that never appear in training data (unseen voices for benchmarks).
HELDOUT_ESPEAK_VARIANTS = frozenset({"f4", "m7", "klatt3", "Annie", "edward", "Michael", "steph2", "zac"})
HELDOUT_ESPEAK_LANGUAGES = frozenset({"en-029"})


def voice_split(voice: str) -> str:
    """'train' or 'test' for a voice spec such as ``espeak:en-gb+f4`` or ``piper:joe``."""
    backend, _, name = voice.partition(":")
    if backend == "espeak":
        language, _, variant = name.partition("+")
        variant = variant.split("/")[0]
        if variant in HELDOUT_ESPEAK_VARIANTS or language in HELDOUT_ESPEAK_LANGUAGES:
            return "test"
    return "train"


# English espeak-ng languages and variants that make up the voice catalogue.
ESPEAK_LANGUAGES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc", "en-029")
ESPEAK_VARIANTS = (
    "", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2", "klatt3",
    "Andy", "Annie", "Denis", "Gene", "Lee", "Mike", "Michael", "Storm", "adam", "anika", "benjamin", "david",
    "edward", "john", "linda", "max", "paul", "robert", "steph", "steph2", "travis", "victor", "zac",
)


def voice_catalog(split: str | None = None, backends: tuple[str, ...] = ("espeak", "piper")) -> list[str]:
    """Voice specs of the catalogue (espeak languages x variants, and Piper), optionally of one split."""
    voices = []
    if "espeak" in backends:
        voices += [f"espeak:{lang}" + (f"+{v}" if v else "") for lang in ESPEAK_LANGUAGES for v in ESPEAK_VARIANTS]
    if "piper" in backends:
        voices += ["piper:joe"]
    return [v for v in voices if split is None or voice_split(v) == split]


# --- word lists ---------------------------------------------------------------------------

_NAMES = "Anna Ben Carla David Emma Frank Grace Henry Isla Jack Kate Leo Maya Noah Olivia Paul Quinn Rosa Sam Tara Uma Victor Wendy Yusuf Zoe".split()
_OBJECTS = "book cup phone key lamp chair bag coat ticket letter box bottle pen clock map jacket umbrella basket plate candle".split()
_PLACES = "kitchen garden office station library market park school bridge beach hospital museum bakery garage hallway".split()
_COLORS = "red blue green yellow black white orange purple brown grey".split()
_ADJECTIVES = "small big old new heavy light warm cold quiet bright".split()
_VERBS_PAST = "found lost moved opened closed painted carried cleaned bought sold borrowed dropped".split()
_TIMES_OF_DAY = "this morning|last night|yesterday|on Sunday|after lunch|before dinner|at noon|today".split("|")
_MONTHS = "January February March April May June July August September October November December".split()
_WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
_DEVICES = "lights|heater|fan|music|television|radio|oven|alarm".split("|")
_ROOMS = "kitchen|bedroom|living room|bathroom|office|garage|hall".split("|")

_CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
    "Greece": "Athens", "Ireland": "Dublin", "Portugal": "Lisbon", "Austria": "Vienna", "Poland": "Warsaw",
    "Russia": "Moscow", "China": "Beijing", "India": "New Delhi", "Mexico": "Mexico City", "Chile": "Santiago",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Cuba": "Havana", "Thailand": "Bangkok",
}
_ANIMAL_SOUNDS = {"dog": "barks", "cat": "meows", "cow": "moos", "duck": "quacks", "lion": "roars", "sheep": "bleats", "horse": "neighs", "owl": "hoots", "snake": "hisses", "bee": "buzzes"}
_OPPOSITES = {"hot": "cold", "up": "down", "big": "small", "fast": "slow", "happy": "sad", "early": "late", "open": "closed", "light": "dark", "full": "empty", "old": "young", "loud": "quiet", "wet": "dry"}
_COLORS_OF = {"the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "coal": "black", "a tomato": "red", "an orange": "orange", "chocolate": "brown"}
_COUNTS = {"days in a week": 7, "months in a year": 12, "hours in a day": 24, "minutes in an hour": 60, "legs on a spider": 8, "legs on a dog": 4, "sides on a triangle": 3, "wheels on a bicycle": 2, "days in a leap year": 366, "seconds in a minute": 60}
BACKCHANNELS = ["mm-hm", "yeah", "right", "okay", "uh-huh", "I see", "sure"]


def _numbers(rng: random.Random) -> dict:
    n = rng.choice([rng.randint(0, 20), rng.randint(21, 999), rng.randint(1000, 99999)])
    template = rng.choice([
        "The number is {n}.", "I counted {n} of them.", "Please enter {n}.", "Room {n} is on the left.",
        "There were {n} people at the meeting.", "It costs {n} dollars.", "Your code is {n}.", "We drove {n} miles.",
    ])
    return {"text": template.format(n=number_to_words(n))}


def _dates_times(rng: random.Random) -> dict:
    kind = rng.randrange(3)
    if kind == 0:
        day = ordinal_to_words(rng.randint(1, 28))
        text = rng.choice(["The meeting is on {m} {d}.", "My birthday is {m} {d}.", "We leave on {w}, {m} {d}.", "The shop opens again on {m} {d}."]).format(
            m=rng.choice(_MONTHS), d=day, w=rng.choice(_WEEKDAYS))
    elif kind == 1:
        hour, minute = rng.randint(1, 12), rng.choice([0, 5, 10, 15, 20, 30, 40, 45, 50])
        spoken = number_to_words(hour) + (" o'clock" if minute == 0 else (" oh " if minute < 10 else " ") + number_to_words(minute))
        text = rng.choice(["It is {t}.", "The train leaves at {t}.", "Wake me up at {t}.", "The film starts at {t} tonight.", "Lunch is at {t}."]).format(t=spoken)
    else:
        year = rng.randint(1900, 2030)
        spoken = number_to_words(year // 100) + " " + ("hundred" if year % 100 == 0 else ("oh " if year % 100 < 10 else "") + number_to_words(year % 100))
        text = rng.choice(["She was born in {y}.", "The house was built in {y}.", "That happened in {y}."]).format(y=spoken)
    return {"text": text}


# Operand ranges of the arithmetic questions: the sums, differences and products a voice
# assistant is asked (793 in all), few enough for the small default LM to learn them all.
_ARITHMETIC_RANGES = {"plus": (20, 20), "minus": (20, None), "times": (10, 10)}


def _operation(rng: random.Random) -> tuple[int, str, int, int]:
    """(a, op, b, result) of one arithmetic fact in :data:`_ARITHMETIC_RANGES`."""
    op = rng.choice(sorted(_ARITHMETIC_RANGES))
    top_a, top_b = _ARITHMETIC_RANGES[op]
    a = rng.randint(0, top_a)
    b = rng.randint(0, a if top_b is None else top_b)  # minus: never negative
    return a, op, b, {"plus": a + b, "minus": a - b, "times": a * b}[op]


def _arithmetic(rng: random.Random) -> dict:
    a, op, b, c = _operation(rng)
    aw, bw, cw = number_to_words(a), number_to_words(b), number_to_words(c)
    question = rng.choice(["What is {a} {op} {b}?", "How much is {a} {op} {b}?", "Can you tell me what {a} {op} {b} is?"]).format(a=aw, op=op, b=bw)
    answer = rng.choice(["{a} {op} {b} is {c}.", "The answer is {c}.", "It is {c}."]).format(a=aw.capitalize(), op=op, b=bw, c=cw)
    return {"text": question, "answer": answer, "answer_value": cw}


def _fact(rng: random.Random) -> tuple[str, str, list[str], list[str]]:
    """One fact: (kind, its value, question wordings, statement wordings)."""
    kind = rng.choice(["capital", "sound", "opposite", "color", "count"])
    if kind == "capital":
        country = rng.choice(sorted(_CAPITALS))
        city = _CAPITALS[country]
        questions = [f"What is the capital of {country}?", f"Which city is the capital of {country}?", f"Do you know the capital of {country}?"]
        statements = [f"The capital of {country} is {city}.", f"{city} is the capital of {country}.", f"The capital city of {country} is {city}."]
        return kind, city, questions, statements
    if kind == "sound":
        animal = rng.choice(sorted(_ANIMAL_SOUNDS))
        sound = _ANIMAL_SOUNDS[animal]
        questions = [f"What sound does a {animal} make?", f"What does a {animal} say?", f"How does a {animal} sound?"]
        statements = [f"A {animal} {sound}.", f"The {animal} {sound}.", f"When a {animal} makes a sound, it {sound}."]
        return kind, sound, questions, statements
    if kind == "opposite":
        word = rng.choice(sorted(_OPPOSITES))
        other = _OPPOSITES[word]
        questions = [f"What is the opposite of {word}?", f"What is the opposite of the word {word}?", f"Can you tell me the opposite of {word}?"]
        statements = [f"The opposite of {word} is {other}.", f"{other.capitalize()} is the opposite of {word}.", f"The word {word} is the opposite of {other}."]
        return kind, other, questions, statements
    if kind == "color":
        thing = rng.choice(sorted(_COLORS_OF))
        color = _COLORS_OF[thing]
        subject = thing[0].upper() + thing[1:]
        questions = [f"What color is {thing}?", f"What is the color of {thing}?", f"Which color is {thing}?"]
        statements = [f"{subject} is {color}.", f"The color of {thing} is {color}.", f"{subject} has the color {color}."]
        return kind, color, questions, statements
    what = rng.choice(sorted(_COUNTS))
    n = number_to_words(_COUNTS[what])
    questions = [f"How many {what} are there?", f"Can you tell me how many {what} there are?", f"Do you know how many {what} there are?"]
    statements = [f"There are {n} {what}.", f"The number of {what} is {n}.", f"{n.capitalize()} is the number of {what}."]
    return kind, n, questions, statements


def _facts(rng: random.Random) -> dict:
    kind, value, questions, statements = _fact(rng)
    answer = statements[0] if rng.random() < 0.7 else f"It is {value}." if kind != "count" else f"There are {value}."
    return {"text": rng.choice(questions), "answer": answer, "answer_value": value}


def _knowledge(rng: random.Random) -> dict:
    """A statement of one fact or arithmetic result: what the text LM should know.

    The questions of ``arithmetic`` and ``facts`` are split by their wording, so a held-out
    question is never trained on; what it asks about is here, as a statement, like the facts a
    text LLM reads in pretraining. Every statement is training text (``always_train``)."""
    if rng.random() < 0.5:
        a, op, b, c = _operation(rng)
        aw, bw, cw = number_to_words(a), number_to_words(b), number_to_words(c)
        text = rng.choice(["{a} {op} {b} is {c}.", "{a} {op} {b} equals {c}.", "{a} {op} {b} makes {c}."]).format(a=aw.capitalize(), op=op, b=bw, c=cw)
    else:
        text = rng.choice(_fact(rng)[3])
    return {"text": text, "always_train": True}


def _everyday(rng: random.Random) -> dict:
    name, other = rng.sample(_NAMES, 2)
    obj, place = rng.choice(_OBJECTS), rng.choice(_PLACES)
    text = rng.choice([
        "{name} {verb} the {adj} {obj} in the {place} {time}.",
        "Have you seen my {color} {obj}? I left it in the {place}.",
        "{name} and {other} walked to the {place} {time}.",
        "The {obj} on the table belongs to {name}.",
        "I think the {place} closes early {time}.",
        "{name} asked {other} to bring a {color} {obj}.",
        "Could you put the {obj} back in the {place}, please?",
        "It was a {adj} day, so we stayed near the {place}.",
        "{name} said the {obj} was too {adj} to carry.",
        "We met {other} outside the {place} {time}.",
    ]).format(name=name, other=other, verb=rng.choice(_VERBS_PAST), adj=rng.choice(_ADJECTIVES), obj=obj,
              place=place, time=rng.choice(_TIMES_OF_DAY), color=rng.choice(_COLORS))
    return {"text": text}


def _commands(rng: random.Random) -> dict:
    text = rng.choice([
        "Turn on the {room} {device}.", "Turn off the {device} in the {room}.", "Set a timer for {n} minutes.",
        "Remind me to call {name} at {h} o'clock.", "Play some quiet music in the {room}.", "Add a {obj} to my shopping list.",
        "Open the {room} door.", "Call {name} back in {n} minutes.", "Turn the {device} up a little.", "Cancel my alarm for tomorrow.",
    ]).format(room=rng.choice(_ROOMS), device=rng.choice(_DEVICES), n=number_to_words(rng.randint(1, 45)),
              name=rng.choice(_NAMES), h=number_to_words(rng.randint(1, 12)), obj=rng.choice(_OBJECTS))
    return {"text": text}


def _dialogues(rng: random.Random) -> dict:
    """A short two-person exchange: maybe a greeting, a question from A, B's answer, maybe thanks.

    Half the dialogues open with the question itself (a voice agent must answer a question it
    hears first, not greet back). A dialogue belongs to its question's split (``split_text``), so
    a held-out question never appears inside a training dialogue."""
    name = rng.choice(_NAMES)
    opener = rng.choice(["Hi {n}.", "Hello there.", "Good morning.", "Hey, do you have a minute?", "Excuse me."]).format(n=name)
    reply = rng.choice(["Hi, how can I help?", "Sure, what is it?", "Good morning to you too.", "Yes, go ahead."])
    qa = rng.choice([_arithmetic, _facts])(rng)
    turns = [["A", opener], ["B", reply]] if rng.random() < 0.5 else []
    turns += [["A", qa["text"]], ["B", qa["answer"]]]
    if rng.random() < 0.5:
        turns += [["A", rng.choice(["Thanks a lot.", "Great, thank you.", "Perfect, thanks."])], ["B", rng.choice(["You're welcome.", "Any time.", "Glad to help."])]]
    return {"text": " ".join(t for _, t in turns), "turns": turns, "answer_value": qa["answer_value"], "split_text": qa["text"]}


_COMPOUND_PARTS = ("everyday", "commands", "numbers", "dates_times")
_COMPOUND_JOINERS = (", and ", ", and ", ", but ", ", so ", "; then ")


def _compound(rng: random.Random) -> dict:
    """Two or three sentences of the everyday, commands, numbers and dates_times sources said in one utterance:
    joined into one long sentence by a clause mark and a conjunction ("A, and b, but c."), or, one time in three,
    kept as sentences of their own ("A. B."). TTS and ASR examples of single sentences teach neither a long
    sentence nor a sentence that follows another; decoding cuts both at their seams (``split_clauses``, ASR's
    pauses), this is the data that would teach them. All its parts come from one split, the first part's
    (``split_text``), so a held-out sentence never hides inside a training item."""
    count = rng.choice((2, 2, 3))
    parts: list[str] = []
    split = None
    for _ in range(100 * count):
        text = SOURCES[rng.choice(_COMPOUND_PARTS)](rng)["text"]
        if len(split_sentences(text)) > 1:  # a part is one sentence
            continue
        if split is None or text_split(text) == split:
            split = split or text_split(text)
            parts.append(text)
        if len(parts) == count:
            break
    if rng.random() < 1 / 3:
        text = " ".join(parts)
    else:
        text = parts[0].rstrip(".?!")
        for part in parts[1:]:
            first, _, rest = part.rstrip(".?!").partition(" ")
            text += rng.choice(_COMPOUND_JOINERS) + (first if first == "I" or first in _NAMES else first.lower()) + (" " + rest if rest else "")
        text += "."
    return {"text": text, "parts": parts, "split_text": parts[0]}


SOURCES: dict[str, Callable[[random.Random], dict]] = {
    "numbers": _numbers,
    "dates_times": _dates_times,
    "arithmetic": _arithmetic,
    "facts": _facts,
    "everyday": _everyday,
    "commands": _commands,
    "dialogues": _dialogues,
    "knowledge": _knowledge,
    "compound": _compound,
}


def generate(source: str, count: int, split: str = "train", seed: int = 0, max_tries_per_item: int = 200) -> list[dict]:
    """``count`` distinct items of ``source`` in ``split`` (fewer if the source runs dry).

    Deterministic for (source, count, split, seed). Each item gets ``id``, ``source``
    and ``split`` fields.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown text source {source!r}; choose from {', '.join(SOURCES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    rng = random.Random(f"{source}:{seed}")
    seen: set[str] = set()
    splits: dict[str, str] = {}  # text -> its split (a source running dry draws the same texts again and again)
    items: list[dict] = []
    tries = 0
    while len(items) < count and tries < count * max_tries_per_item:
        tries += 1
        item = SOURCES[source](rng)
        key = item["text"].lower()
        if key in seen:
            continue
        # An item may name the text that decides its split (a dialogue: its question), or be
        # training text whatever its hash (a knowledge statement).
        split_text = item.pop("split_text", item["text"])
        if split_text not in splits:
            splits[split_text] = text_split(split_text)
        if ("train" if item.pop("always_train", False) else splits[split_text]) != split:
            continue
        seen.add(key)
        item.update(id=f"{source}-{split}-{stable_hash(key) % 10**10:010d}", source=source, split=split)
        items.append(item)
    return items


def answer_items(items: list[dict]) -> list[dict]:
    """The distinct answers of QA ``items`` as items of their own (``text`` = the answer), for
    synthesizing the assistant's spoken answers; items without an answer are skipped."""
    seen: set[str] = set()
    answers: list[dict] = []
    for item in items:
        answer = item.get("answer")
        if not answer or answer.lower() in seen:
            continue
        seen.add(answer.lower())
        answers.append(
            {"text": answer, "id": f"answer-{stable_hash(answer.lower()) % 10**10:010d}", "source": f"{item.get('source', 'qa')}_answers", "split": item.get("split", text_split(answer))}
        )
    return answers


def iter_text_file(path: str | Path) -> Iterator[dict]:
    """Items from a user file: ``.jsonl`` (objects with ``text``) or plain text (one per line).

    Blank lines are skipped; ids default to a hash of the text; extra JSON fields pass through.
    """
    p = Path(path)
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if p.suffix == ".jsonl":
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(item, dict) or not isinstance(item.get("text"), str):
                    raise ValueError(f"{p}:{lineno}: expected an object with a 'text' string")
            else:
                item = {"text": line}
            item.setdefault("id", f"utt-{stable_hash(item['text']) % 10**10:010d}")
            item.setdefault("split", text_split(item["text"]))
            yield item


def write_jsonl(items: list[dict], path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
