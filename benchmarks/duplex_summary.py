"""One line per ``benchmarks/duplex.py`` result file: replies, onset, barge-in, backchannels, and what the answer
assist heard and said (from the rows: the user transcript equal to the question, the expected answer in the reply's
text by :func:`speechlm.judge.answer_heard`; no judge needed).

    python benchmarks/duplex_summary.py docs/results/loud_room/*.json [--out summary.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from speechlm.judge import answer_heard
from speechlm.training.textnorm import words_for_scoring


def summarize(path: str) -> dict:
    data = json.loads(Path(path).read_text())
    s, rows = data["summary"], data["rows"]
    heard_right = sum(any(words_for_scoring(t or "") == words_for_scoring(r["question"]) for t in r.get("user_transcripts", [])) for r in rows)
    backchannels = [b for r in rows for b in r["backchannel"] if b["counts"]]
    return {
        "file": Path(path).name,
        "replied": f"{round(s['replied'] * len(rows))} / {len(rows)}",
        "onset_ms": [s["onset_ms_median"], s["onset_ms_p90"]],
        "barge_in_ms": [s["barge_in_ms_median"], s["barge_in_ms_p90"]],
        "barge_in_trials": s["barge_in_trials"],
        "talked_on_after_backchannel": f"{sum(b['talked_on'] for b in backchannels)} / {len(backchannels)}",
        "spoke_during_question_share": round(s["spoke_during_question_share"], 3),
        "question_heard_right": heard_right,
        "answer_in_reply_text": sum(answer_heard(r["expected"], r["model_text"]) for r in rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out")
    args = ap.parse_args()
    results = [f for f in sorted(args.files) if isinstance(data := json.loads(Path(f).read_text()), dict) and "rows" in data]
    lines = [summarize(f) for f in results]  # (other files, e.g. an earlier summary, are passed over)
    for line in lines:
        print(json.dumps(line))
    if args.out:
        Path(args.out).write_text(json.dumps(lines, indent=1) + "\n")


if __name__ == "__main__":
    main()
