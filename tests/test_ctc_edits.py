"""Spliced CTC likelihoods of edited label sequences (speechlm.ctc_edits) equal ctc_loss on each whole sequence."""

import random

import pytest
import torch
import torch.nn.functional as F

from speechlm.ctc_edits import _length_groups, ctc_backward, ctc_forward, edit_nlls
from speechlm.transcript_check import Lexicon, _apply, _edits, _tokens, _WordPhonemes, edit_splices, edits


def _ctc(lp: torch.Tensor, labels: list[int]) -> float:
    return F.ctc_loss(lp[:, None].double(), torch.tensor(labels)[None], torch.tensor([lp.shape[0]]), torch.tensor([len(labels)]),
                      reduction="none").item()


def _random_edits(rng: random.Random, ref: list[int], vocab: int, count: int) -> list[tuple[int, list[int], int]]:
    out = [(len(ref), [], 0), (0, [], len(ref)), (0, [3], 0), (0, [], len(ref) - 1), (1, [], 0)]
    while len(out) < count:
        a = rng.randrange(0, len(ref) + 1)
        b = rng.randrange(0, len(ref) - a + 1)
        m = [rng.randrange(1, vocab) for _ in range(rng.randrange(0, 5))]
        if rng.random() < 0.3 and a > 0:
            m = [ref[a - 1], *m]  # the middle starts with the prefix's last label: a blank must part them
        if rng.random() < 0.3 and b > 0:
            m = [*m, ref[len(ref) - b]]  # ... ends with the suffix's first label
        if a + b + len(m):
            out.append((a, m, b))
    return out


@pytest.mark.parametrize("sharpness", [1.0, 3.0, 40.0])
def test_edit_nlls_equal_ctc_loss_of_each_whole_sequence(sharpness):
    torch.manual_seed(0)
    rng = random.Random(int(sharpness))
    vocab, frames = 12, 70
    lp = (torch.randn(frames, vocab) * sharpness).log_softmax(-1)
    ref = [rng.randrange(1, vocab) for _ in range(16)]
    ref[5] = ref[4]  # a repeated label inside the reference
    edits = _random_edits(rng, ref, vocab, 300)
    got = edit_nlls(lp, ref, edits)
    want = [_ctc(lp, ref[:a] + m + ref[len(ref) - b :]) for a, m, b in edits]
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, rel=1e-5, abs=1e-3)


def test_middles_run_in_groups_of_similar_length():
    assert _length_groups([1, 2, 5, 6, 9], (5,)) == [range(0, 3), range(3, 5)]
    assert _length_groups([6, 7], (3, 5)) == [range(0, 2)] and _length_groups([], (5,)) == []


def test_edits_the_frames_cannot_hold_score_inf():
    torch.manual_seed(1)
    lp = torch.randn(6, 8).log_softmax(-1)
    ref = [1, 2, 2, 3]  # needs 5 frames (the repeat needs a blank between)
    got = edit_nlls(lp, ref, [(4, [], 0), (4, [5, 5], 0), (2, [], 2), (0, [1, 1, 1, 1], 0)])
    assert got[0] == pytest.approx(_ctc(lp, ref), rel=1e-5)
    assert got[1] == float("inf") and got[3] == float("inf")  # 8 and 7 frames needed
    assert got[2] == pytest.approx(_ctc(lp, [1, 2, 2, 3][:2] + [2, 3]), rel=1e-5)


def test_forward_and_backward_give_the_same_total():
    torch.manual_seed(2)
    lp = torch.randn(30, 9).log_softmax(-1)
    labels = [3, 3, 4, 1, 5]
    alpha, beta = ctc_forward(lp, labels), ctc_backward(lp, labels)
    want = -_ctc(lp, labels)
    assert torch.logaddexp(alpha[-1, -1], alpha[-1, -2]).item() == pytest.approx(want, rel=1e-5)
    for t in (1, 12, 30):  # sum over states of alpha * beta at any frame
        assert torch.logsumexp(alpha[t] + beta[t], 0).item() == pytest.approx(want, rel=1e-5)


def test_bad_edits_are_errors():
    lp = torch.randn(10, 5).log_softmax(-1)
    assert edit_nlls(lp, [1, 2], []) == []
    with pytest.raises(ValueError):
        edit_nlls(lp, [1, 2], [(2, [3], 1)])  # a + b > len
    with pytest.raises(ValueError):
        edit_nlls(lp, [1, 2], [(0, [], 0)])  # nothing left


def test_each_edit_is_spliced_from_the_transcripts_phonemes():
    """The check's (a, middle, b) of every one-word edit rebuild the edited transcript's own phonemes,
    first words recased and punctuation moved included."""
    lexicon = Lexicon({"what": ["w", "ʌ", "t"], "does": ["d", "ʌ", "z"], "a": ["ɐ"], "duck": ["d", "ʌ", "k"], "Ben": ["b", "ɛ", "n"],
                       "say": ["s", "eɪ"], "snake": ["s", "n", "eɪ", "k"]})
    phonemes = _WordPhonemes(lexicon, lambda word: list(word.lower()))  # a word outside the lexicon: its letters
    for transcript in ("What does a duck say?", "Ben, say what?", "Duck.", "What does zebra say?", '"Ben" does.'):
        tokens = _tokens(transcript)
        ref = phonemes.of(tokens)
        candidates = _edits(tokens, lexicon)
        assert len(candidates) >= len(edits(tokens, lexicon))  # the check's list may hold a text twice
        for edit, (a, middle, b) in zip(candidates, edit_splices(tokens, candidates, phonemes), strict=True):
            assert ref[:a] + list(middle) + ref[len(ref) - b :] == phonemes.of(_apply(tokens, edit))
