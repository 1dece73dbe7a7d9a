from speechlm.training import textgen
from speechlm.training.textnorm import normalize_text, number_to_words, ordinal_to_words, split_clauses, split_sentences, spoken_words


def test_numbers():
    assert number_to_words(0) == "zero"
    assert number_to_words(412) == "four hundred twelve"
    assert number_to_words(1_000_001) == "one million one"
    assert ordinal_to_words(21) == "twenty first" and ordinal_to_words(40) == "fortieth" and ordinal_to_words(12) == "twelfth"


def test_normalize():
    assert normalize_text("At 3:05 pay $12.50, 1,000 or 15%.") == "At three oh five pay twelve dollars and fifty cents, one thousand or fifteen percent."
    assert spoken_words(normalize_text("Don't stop at the 2nd x-ray!")) == ["Don't", "stop", "at", "the", "second", "x", "ray"]


def test_generators_deterministic_and_split():
    for source in textgen.SOURCES:
        if source == "knowledge":  # training text only (test below)
            continue
        a = textgen.generate(source, 20, split="train", seed=3)
        b = textgen.generate(source, 20, split="train", seed=3)
        assert a == b and len(a) == 20
        test = textgen.generate(source, 10, split="test", seed=3)
        assert test and not {x["text"] for x in a} & {x["text"] for x in test}
        assert all(x["split"] == "test" for x in test)
        if source not in ("dialogues", "compound"):  # a dialogue's split is its question's, a compound's its parts' (below)
            assert all(textgen.text_split(x["text"]) == "test" for x in test)
        assert all(not any(ch.isdigit() for ch in x["text"]) for x in a + test), "built-in texts are spoken form"


def test_qa_items_have_answers():
    for item in textgen.generate("arithmetic", 30) + textgen.generate("facts", 30):
        assert item["answer_value"].lower() in item["answer"].lower()
    for item in textgen.generate("dialogues", 5):
        assert [s for s, _ in item["turns"]][:2] == ["A", "B"]


def test_knowledge_states_what_held_out_questions_ask():
    """Held-out questions are held out by their wording; the facts they ask about are training text."""
    assert textgen.generate("knowledge", 10, split="test") == []
    known = " ".join(x["text"].lower() for x in textgen.generate("knowledge", 5000))
    assert "two plus three is five" in known or "two plus three equals five" in known or "two plus three makes five" in known
    for item in textgen.generate("arithmetic", 40, split="test") + textgen.generate("facts", 20, split="test"):
        assert item["answer_value"].lower() in known, item
    train_questions = {x["text"] for x in textgen.generate("facts", 500)}
    test_questions = {x["text"] for x in textgen.generate("facts", 500, split="test")}
    assert test_questions and not test_questions & train_questions


def test_voice_split():
    assert textgen.voice_split("espeak:en-us") == "train"
    assert textgen.voice_split("espeak:en-gb+f4") == "test"
    assert textgen.voice_split("espeak:en-029+m2") == "test"
    assert textgen.voice_split("piper:joe") == "train"


def test_user_text_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("Hello there.\n\n  Second line.  \n")
    items = list(textgen.iter_text_file(p))
    assert [i["text"] for i in items] == ["Hello there.", "Second line."]
    assert len({i["id"] for i in items}) == 2


def test_answer_items_are_distinct_answers(cli, tmp_path):
    qa = textgen.generate("arithmetic", 40) + textgen.generate("everyday", 5)
    answers = textgen.answer_items(qa)
    texts = [a["text"] for a in answers]
    assert texts and len({t.lower() for t in texts}) == len(texts), "deduplicated"
    assert set(texts) <= {q.get("answer") for q in qa}, "only answers, nothing from items without one"
    out = tmp_path / "answers.jsonl"
    r = cli("data", "texts", "--builtin", "arithmetic,facts", "--count", "20", "--answers", "-o", str(out))
    assert r.returncode == 0, r.stderr
    r = cli("data", "texts", "--builtin", "everyday", "--count", "5", "--answers", "-o", str(out))
    assert r.returncode == 2 and "has answers" in r.stderr


def _question(dialogue: dict) -> str:
    """The QA question of a built-in dialogue: the A turn before the B turn with the answer."""
    turns = dialogue["turns"]
    return next(turns[i - 1][1] for i, (s, t) in enumerate(turns) if s == "B" and dialogue["answer_value"].lower() in t.lower())


def test_dialogues_keep_held_out_questions_out_and_often_open_with_the_question():
    train = textgen.generate("dialogues", 200, split="train")
    assert all(textgen.text_split(_question(d)) == "train" for d in train), "a held-out question inside a training dialogue"
    opens_with_question = sum(d["turns"][0][1] == _question(d) for d in train)
    assert 60 <= opens_with_question <= 140
    assert all("split_text" not in d for d in train)
    test = textgen.generate("dialogues", 20, split="test")
    assert test and all(textgen.text_split(_question(d)) == "test" for d in test)
def test_split_sentences():
    assert split_sentences("Hello there. How are you? I am fine!") == ["Hello there.", "How are you?", "I am fine!"]
    # not after a title or an initial, nor inside a number; a quote or bracket stays with its sentence
    assert split_sentences('Dr. Smith met J. K. Rowling at 3.5 pm. "Quote." Then (this).') == [
        "Dr. Smith met J. K. Rowling at 3.5 pm.", '"Quote."', "Then (this)."]
    assert split_sentences("It costs $3. Then go.\nA new line\n\n") == ["It costs $3.", "Then go.", "A new line"]
    assert split_sentences("see e.g. this one") == ["see e.g. this one"]  # a lower-case word after a dot: one sentence
    assert split_sentences("") == [] and split_sentences("  \n ") == []


def test_split_clauses_keeps_each_part_within_the_words_the_speaker_learned():
    short = "It was a new day, so we stayed near the garden."
    assert split_clauses(short, 14) == [short] and split_clauses(short, 0) == [short]
    # too long: cut after every clause mark and a conjunction right after it, a short clause ("please") kept with
    # the one before; a part before the last ends with a full stop (its conjunction last), one after the first
    # starts with a capital
    long = "Room 89,914 is on the left, and could you put the bottle back, please, and I counted twenty of them."
    assert split_clauses(long, 14) == ["Room 89,914 is on the left and.", "Could you put the bottle back, please and.", "I counted twenty of them."]
    assert split_clauses("Monday, we went to the old market near the river; it was closed — so we walked home.", 12) == [
        "Monday, we went to the old market near the river.", "It was closed so.", "We walked home."]
    # a clause still too long: cut after as few conjunctions as it takes ("Andrew" is not one), then into even runs of words
    assert split_clauses("Andrew and Brandon went to the old store downtown because they wanted to buy some fresh bread.", 10) == [
        "Andrew and Brandon went to the old store downtown because.", "They wanted to buy some fresh bread."]
    words = " ".join(number_to_words(n) for n in range(1, 18))  # 17 words, no marks: two runs of 9 and 8
    assert [len(p.split()) for p in split_clauses(words, 14)] == [9, 8]
    for max_words in (3, 5, 8):
        parts = split_clauses(long, max_words)
        assert all(len(spoken_words(normalize_text(p))) <= max_words or len(p.split()) == 1 for p in parts)  # "89,914": 6 words
        assert [w.lower().strip(".,") for p in parts for w in p.split()] == [w.lower().strip(".,") for w in long.split()]


def test_normalize_says_abbreviations_units_and_drops_emoji():
    assert normalize_text("Dr. Smith, e.g. here, i.e. now.") == "Doctor Smith, for example here, that is now."
    assert normalize_text("It is 10 km away, 1 km more, at -5°C, 60 mph.") == (
        "It is ten kilometers away, one kilometer more, at minus five degrees Celsius, sixty miles per hour.")
    assert normalize_text("A 5kg bag, the kmart, 3 kms.") == "A five kilograms bag, the kmart, three kms."  # a unit only after a number
    assert normalize_text("I love it 😀!") == "I love it !" and normalize_text("Call 555-1234.") == (
        "Call five hundred fifty five one thousand two hundred thirty four.")


def test_normalize_reads_years_where_a_year_is_asked_for():
    assert normalize_text("It was built in 1913, since 2007, in the 1990s.") == (
        "It was built in nineteen thirteen, since two thousand seven, in the nineteen nineties.")
    assert normalize_text("She was born on June 5, 1901.") == "She was born on June fifth, nineteen oh one."
    assert normalize_text("The year 2024.") == "The year twenty twenty four."
    # elsewhere a number stays a quantity; "may" is a verb
    assert normalize_text("I counted 2072 of them; room 1913; may 5 people come.") == (
        "I counted two thousand seventy two of them; room one thousand nine hundred thirteen; may five people come.")


def test_compound_items_join_sentences_of_one_split():
    for split in ("train", "test"):
        items = textgen.generate("compound", 40, split=split, seed=2)
        assert len(items) == 40
        for item in items:
            assert 2 <= len(item["parts"]) <= 3 and all(textgen.text_split(p) == split for p in item["parts"])
            assert all(len(split_sentences(p)) == 1 for p in item["parts"])
            said = [w.lower() for w in spoken_words(item["text"])]
            parts = [[w.lower() for w in spoken_words(p)] for p in item["parts"]]
            if len(split_sentences(item["text"])) > 1:  # sentences of their own: the parts' words, in order
                assert said == [w for p in parts for w in p]
            else:  # one sentence: the parts' words with one conjunction before each part after the first
                k = 0
                for i, p in enumerate(parts):
                    if i:
                        assert said[k] in ("and", "but", "so", "then")
                        k += 1
                    assert said[k : k + len(p)] == p
                    k += len(p)
                assert k == len(said)
        # one long sentence with a clause mark and a conjunction, or sentences of their own
        assert any(len(split_sentences(x["text"])) == 1 for x in items) and any(len(split_sentences(x["text"])) > 1 for x in items)
