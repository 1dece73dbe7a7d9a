"""`speechlm data tokenize`: batched codes equal per-file codes; word frames; stereo; resume."""

import numpy as np
import torch

from speechlm.codec.audio import load_audio
from speechlm.codec.config import TINY_ARCHITECTURE, CodecConfig
from speechlm.codec.model import Codec
from speechlm.training.dialogues import DialogueConfig, synthesize_dialogues
from speechlm.training.synth import SynthConfig, synthesize_corpus
from speechlm.training.tokenize import TokenCorpus, tokenize_corpus

TINY = {**TINY_ARCHITECTURE, "groups": 2, "num_quantizers": 2, "codebook_size": 64}


def test_tokenize_mono_and_stereo(tmp_path):
    torch.manual_seed(0)
    codec = Codec(CodecConfig(**TINY)).eval()
    items = [{"id": f"u{i}", "text": t} for i, t in enumerate(["Hi.", "The cat sat on the mat today.", "Please call me back at noon."])]
    synthesize_corpus(items, tmp_path / "corpus", SynthConfig(voices=["espeak:en-us"]), progress=False)
    summary = tokenize_corpus(tmp_path / "corpus", tmp_path / "tok", codec, "tiny", chunk_size=2, batch_size=3, progress=False)
    assert summary.utterances == 3
    corpus = TokenCorpus(tmp_path / "tok")
    for i in range(3):
        row, (codes,) = corpus[i]
        audio = load_audio(tmp_path / "corpus" / row["audio"])
        alone = codec.encode(torch.from_numpy(audio)[None])[0].numpy()
        assert np.array_equal(codes, alone), "batched (padded) codes equal codes of the file alone"
        assert row["num_frames"] == len(alone)
        frames = [(w["start_frame"], w["end_frame"]) for w in row["words"]]
        assert all(0 <= a < b <= row["num_frames"] for a, b in frames)
        assert [a for a, _ in frames] == sorted(a for a, _ in frames)
    # resume: a finished chunk is skipped
    again = tokenize_corpus(tmp_path / "corpus", tmp_path / "tok", codec, "tiny", chunk_size=2, batch_size=3, progress=False)
    assert again.chunks_done_before == 2

    dialogue = [{"id": "d0", "text": "", "turns": [["A", "Hello there."], ["B", "Hi, how can I help?"]]}]
    synthesize_dialogues(dialogue, tmp_path / "dlg", DialogueConfig(user_voices=["espeak:en-us"], assistant_voices=["espeak:en-gb+f3"]), progress=False)
    tokenize_corpus(tmp_path / "dlg", tmp_path / "dtok", codec, "tiny", progress=False)
    row, channels = TokenCorpus(tmp_path / "dtok")[0]
    assert len(channels) == 2 and channels[0].shape == channels[1].shape == (row["num_frames"], 4)
    assert all("start_frame" in w for c in row["channels"] for w in c["words"])
