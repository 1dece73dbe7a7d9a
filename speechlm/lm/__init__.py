"""speechlm.lm: a Hugging Face causal LM extended to interleaved speech and text, with MCTP heads.

Usage::

    from speechlm.lm import SpeechLM, SpeechLMConfig, tts_frames, text_generate
    model = SpeechLM.from_backbone("path/to/qwen-or-llama", "path/to/tokenizer", output_head="depth")
    model.save_pretrained("out/")
    model = SpeechLM.from_pretrained("out/")
    result = tts_frames(model, prompt_ids, max_frames=250)   # result.frames[b]: (F, Q) codec codes
"""

from .aligned_batch import AlignedSpeechBatch, iter_aligned_audio_batch
from .config import SpeechLMConfig
from .generate import (
    GREEDY,
    AudioStep,
    Decoder,
    PromptBatch,
    Sampling,
    TTSResult,
    iter_aligned_audio,
    iter_audio,
    iter_text,
    sample_codebooks,
    sample_logits,
    speech_segment,
    text_generate,
    tts_frames,
)
from .layout import audio_targets, delay_frames, undelay_frames
from .model import STAGES, SpeechLM, SpeechLMOutput
from .vocab import SpeechVocab, add_speech_tokens, load_tokenizer, train_bpe_tokenizer

__all__ = [
    "GREEDY",
    "STAGES",
    "AudioStep",
    "Decoder",
    "PromptBatch",
    "Sampling",
    "SpeechLM",
    "SpeechLMConfig",
    "SpeechLMOutput",
    "SpeechVocab",
    "TTSResult",
    "add_speech_tokens",
    "audio_targets",
    "delay_frames",
    "iter_aligned_audio",
    "iter_aligned_audio_batch",
    "AlignedSpeechBatch",
    "iter_audio",
    "iter_text",
    "load_tokenizer",
    "sample_codebooks",
    "sample_logits",
    "speech_segment",
    "text_generate",
    "train_bpe_tokenizer",
    "tts_frames",
    "undelay_frames",
]
