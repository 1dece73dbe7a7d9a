"""Text tokenizer handling: the speech LM's special tokens, and a small byte-level BPE trainer.

The text tokenizer is any Hugging Face tokenizer loadable from a local path. The speech LM
adds its special tokens to it (``add_speech_tokens``) and looks their ids up once
(``SpeechVocab``). Audio never enters the text vocabulary: an audio position carries the
placeholder text token ``<|audio|>`` (or, in duplex / fixed-ratio formats, a time-aligned
text token) plus the frame's Q codes, which the model embeds separately.

Tokens (default strings, see :class:`speechlm.lm.config.SpeechLMConfig`):

``<|speech_start|>`` / ``<|speech_end|>``
    around each speech segment; the position of ``<|speech_start|>`` predicts the first frame.
``<|audio|>``
    the text token at audio positions.
``<|text_pad|>``
    text-stream padding where the text runs ahead of or behind the audio (duplex, fixed ratio).
``<|end|>``
    end of a turn.
``<|system|>`` ``<|user|>`` ``<|assistant|>``, ``<|tts|>`` ``<|asr|>`` ``<|chat|>`` ``<|duplex|>``
    role and task tags.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from speechlm.codec.errors import SpeechLMError

from .config import SpeechLMConfig

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"


def add_speech_tokens(tokenizer, config: SpeechLMConfig) -> int:
    """Add the config's special tokens to ``tokenizer`` (in place), and bos/eos/pad if it has none.

    Returns how many tokens were new. Resize the backbone's embeddings afterwards
    (:meth:`SpeechLM.from_backbone` does both).
    """
    added = 0
    missing = {
        name: token
        for name, token in (("bos_token", BOS_TOKEN), ("eos_token", EOS_TOKEN), ("pad_token", PAD_TOKEN))
        if getattr(tokenizer, name, None) is None
    }
    if missing:
        added += tokenizer.add_special_tokens(missing)
    vocab = tokenizer.get_vocab()
    new = [t for t in config.special_tokens if t not in vocab]
    if new:
        added += tokenizer.add_tokens(new, special_tokens=True)
    return added


@dataclass(frozen=True)
class SpeechVocab:
    """Ids of the special tokens in one tokenizer (after :func:`add_speech_tokens`)."""

    speech_start: int
    speech_end: int
    audio: int
    text_pad: int
    end_of_turn: int
    bos: int
    eos: int
    pad: int
    roles: dict[str, int]
    tasks: dict[str, int]
    size: int  # len(tokenizer): every id < size is valid

    @classmethod
    def from_tokenizer(cls, tokenizer, config: SpeechLMConfig) -> SpeechVocab:
        vocab = tokenizer.get_vocab()
        missing = [t for t in config.special_tokens if t not in vocab]
        if missing:
            raise SpeechLMError(f"tokenizer lacks the speech LM's special tokens {missing}; call add_speech_tokens first")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, name, None) is None:
                raise SpeechLMError(f"tokenizer has no {name.removesuffix('_id')}; call add_speech_tokens first")
        return cls(
            speech_start=vocab[config.speech_start_token],
            speech_end=vocab[config.speech_end_token],
            audio=vocab[config.audio_token],
            text_pad=vocab[config.text_pad_token],
            end_of_turn=vocab[config.end_of_turn_token],
            bos=tokenizer.bos_token_id,
            eos=tokenizer.eos_token_id,
            pad=tokenizer.pad_token_id,
            roles={t: vocab[t] for t in config.role_tokens},
            tasks={t: vocab[t] for t in config.task_tokens},
            size=len(tokenizer),
        )


def load_tokenizer(path: str | os.PathLike):
    """Load a Hugging Face tokenizer from a local directory (never from the network)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise SpeechLMError(f"tokenizer directory not found: {path}")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise SpeechLMError(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]}") from None


def train_bpe_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int = 8192,
    min_frequency: int = 2,
    config: SpeechLMConfig | None = None,
    save_dir: str | os.PathLike | None = None,
):
    """Train a byte-level BPE tokenizer on ``texts``; return it as a ``PreTrainedTokenizerFast``.

    Byte-level means every string encodes (no unknown token). bos/eos/pad and the speech
    LM's special tokens (from ``config``, default config if None) get the first ids, so
    the tokenizer is ready for :class:`SpeechLM` as is. ``vocab_size`` counts them.
    Saved with ``save_pretrained`` to ``save_dir`` if given.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    config = config or SpeechLMConfig()
    specials = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *config.special_tokens]
    if vocab_size < len(specials) + 256:
        raise SpeechLMError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least {len(specials) + 256}")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise SpeechLMError("cannot train a tokenizer on no text")

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    # Registered as added special tokens: never split, skipped by decode(skip_special_tokens=True).
    fast.add_tokens(config.special_tokens, special_tokens=True)
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast
