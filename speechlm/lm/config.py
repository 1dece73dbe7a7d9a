"""The speech LM's configuration: one dataclass, saved as ``speechlm_config.json`` beside the weights.

It describes what the speech LM adds to a text backbone (the backbone keeps its own
``config.json`` in ``backbone/``): the audio code layout (Q codebooks of C entries at
``frame_rate`` frames per second), the output head that predicts a frame, the MCTP
modules, the special tokens and the loss weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from speechlm.codec.errors import SpeechLMError

CONFIG_NAME = "speechlm_config.json"
OUTPUT_HEADS = ("parallel_delay", "depth")
SPEECH_LAYOUTS = ("plain", "word_aligned")
# Bump when the meaning of saved weights or fields changes.
FORMAT_VERSION = 1


@dataclass
class SpeechLMConfig:
    """What :class:`speechlm.lm.model.SpeechLM` adds to a causal-LM backbone.

    Audio: one audio frame = one LM position, ``num_codebooks`` (Q = codec groups x
    residual quantizers) codes per frame, each in ``[0, codebook_size)``. Id
    ``codebook_size`` (= C) is the *empty* code: no code at this position (before a
    delayed codebook starts) or *end of speech* (after it stops). Audio heads
    therefore predict C + 1 classes.

    Output head (how one position predicts all Q codes of the next frame):

    * ``"depth"``: a small causal transformer over the Q codebooks (Moshi's depformer).
    * ``"parallel_delay"``: Q linear heads at once, codebook q delayed by ``delays[q]``
      positions (MusicGen); default delays ``0, 1, ..., Q-1``.

    MCTP (VITA-Audio): ``mctp_modules`` light modules (``mctp_layers`` transformer
    blocks each) predict the frames at offsets 2 .. N+1 from one backbone forward.
    ``mctp_schedule`` says how many MCTP frames follow each backbone forward during
    generation: entry s for backbone forward s, the last entry repeating; default
    ``[mctp_modules]`` (every module, every forward).

    Speech layout (how the model's own speech follows the text it speaks: TTS, spoken replies):

    * ``"plain"``: the whole text, then one speech segment; the model must learn where in
      the text it is.
    * ``"word_aligned"``: the whole text, then each word (with the punctuation before it)
      followed by its own speech segment, which the model ends when the word is spoken
      (ELLA-V's idea, at the word level); at inference the words are forced, so speech
      cannot skip, repeat or drift from the text.

    Hearing head (optional, ``hearing_layer`` set): a CTC head on the backbone's hidden state
    after layer ``hearing_layer`` at the positions of heard speech (ASR input, a spoken
    question). It predicts the transcript's text tokens (blank = ``<|text_pad|>``) through the
    tied text output layer, so it costs a norm and a D x D projection. Trained as an auxiliary
    loss (weight ``hearing_loss_weight``), it asks the lower layers to carry the words of what
    they hear, frame by frame, for the upper layers to read; at inference it is also a one-pass
    transcriber (``SpeechLM.hear``).
    """

    # Audio codes (must match the codec whose codes the LM reads and writes).
    num_codebooks: int = 8
    codebook_size: int = 1024
    frame_rate: float = 25.0
    sample_rate: int = 16_000
    codec_id: str | None = None  # e.g. Codec.codec_id; informational, checked by task wrappers
    audio_embed_scale: float | None = None  # sum of Q codebook embeddings is scaled by this; None = 1/sqrt(Q)

    # Output head.
    output_head: str = "depth"
    delays: list[int] | None = None  # parallel_delay only; None = [0, 1, ..., Q-1]
    depth_dim: int = 256
    depth_layers: int = 1
    depth_heads: int = 4

    # MCTP modules.
    mctp_modules: int = 4
    mctp_layers: int = 1
    mctp_intermediate_size: int | None = None  # None = the backbone's intermediate_size
    mctp_schedule: list[int] | None = None  # None = [mctp_modules]

    # Layout of the model's own speech after its text (see above).
    speech_layout: str = "plain"

    # Special tokens (strings added to the text tokenizer; see speechlm.lm.vocab).
    speech_start_token: str = "<|speech_start|>"
    speech_end_token: str = "<|speech_end|>"
    audio_token: str = "<|audio|>"
    text_pad_token: str = "<|text_pad|>"
    end_of_turn_token: str = "<|end|>"
    role_tokens: list[str] = field(default_factory=lambda: ["<|system|>", "<|user|>", "<|assistant|>"])
    task_tokens: list[str] = field(default_factory=lambda: ["<|tts|>", "<|asr|>", "<|chat|>", "<|duplex|>"])

    # Hearing head (CTC on heard speech); None = no hearing head.
    hearing_layer: int | None = None

    # Losses (training only).
    text_loss_weight: float = 1.0
    audio_loss_weight: float = 1.0
    mctp_loss_weight: float = 1.0
    codebook_loss_weights: list[float] | None = None  # None = equal weights
    hearing_loss_weight: float = 0.5

    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        problems = []
        if self.num_codebooks < 1 or self.codebook_size < 2:
            problems.append(f"need num_codebooks >= 1 and codebook_size >= 2, got {self.num_codebooks} and {self.codebook_size}")
        if self.output_head not in OUTPUT_HEADS:
            problems.append(f"output_head must be one of {', '.join(OUTPUT_HEADS)}, got {self.output_head!r}")
        if self.output_head == "parallel_delay":
            if self.delays is None:
                self.delays = list(range(self.num_codebooks))
            if len(self.delays) != self.num_codebooks or min(self.delays) < 0:
                problems.append(f"delays must be {self.num_codebooks} non-negative ints, got {self.delays}")
        elif self.delays is not None and any(self.delays):
            problems.append("delays only apply to output_head='parallel_delay'")
        if self.depth_dim % max(self.depth_heads, 1) or self.depth_layers < 1:
            problems.append(f"depth_dim {self.depth_dim} must be divisible by depth_heads {self.depth_heads}; depth_layers >= 1")
        if self.mctp_modules < 0 or self.mctp_layers < 1:
            problems.append("need mctp_modules >= 0 and mctp_layers >= 1")
        if self.mctp_schedule is not None and (not self.mctp_schedule or min(self.mctp_schedule) < 0):
            problems.append(f"mctp_schedule must be a non-empty list of ints >= 0, got {self.mctp_schedule}")
        if self.speech_layout not in SPEECH_LAYOUTS:
            problems.append(f"speech_layout must be one of {', '.join(SPEECH_LAYOUTS)}, got {self.speech_layout!r}")
        if self.hearing_layer is not None and self.hearing_layer < 1:
            problems.append(f"hearing_layer must be a backbone layer number >= 1, got {self.hearing_layer}")
        if self.codebook_loss_weights is not None and len(self.codebook_loss_weights) != self.num_codebooks:
            problems.append(f"codebook_loss_weights needs {self.num_codebooks} entries, got {len(self.codebook_loss_weights)}")
        if len(set(self.special_tokens)) != len(self.special_tokens):
            problems.append("special tokens must be distinct")
        if problems:
            raise SpeechLMError("invalid speech LM config: " + "; ".join(problems))

    # -- derived -------------------------------------------------------------------

    @property
    def empty_code(self) -> int:
        """The extra code id C: no code here / end of speech."""
        return self.codebook_size

    @property
    def audio_delays(self) -> list[int]:
        """Delay in positions of each codebook (all zeros for the depth head)."""
        return list(self.delays) if self.output_head == "parallel_delay" else [0] * self.num_codebooks

    @property
    def max_delay(self) -> int:
        """Extra positions a speech segment needs at its end to flush delayed codebooks."""
        return max(self.audio_delays)

    @property
    def special_tokens(self) -> list[str]:
        """Every token string the speech LM adds to the text tokenizer."""
        return [
            self.speech_start_token,
            self.speech_end_token,
            self.audio_token,
            self.text_pad_token,
            self.end_of_turn_token,
            *self.role_tokens,
            *self.task_tokens,
        ]

    def schedule(self, override: list[int] | None = None) -> list[int]:
        """MCTP frames after each backbone forward (last entry repeats), clipped to ``mctp_modules``."""
        schedule = override if override is not None else (self.mctp_schedule or [self.mctp_modules])
        if not schedule or min(schedule) < 0:
            raise SpeechLMError(f"mctp schedule must be a non-empty list of ints >= 0, got {schedule}")
        return [min(int(k), self.mctp_modules) for k in schedule]

    # -- (de)serialisation -----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpeechLMConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpeechLMError(f"unknown speech LM config field(s): {', '.join(unknown)}")
        version = data.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise SpeechLMError(
                f"speech LM config format {version} is newer than this speechlm understands ({FORMAT_VERSION}); upgrade speechlm"
            )
        return cls(**data)

    def save(self, directory: str | os.PathLike) -> Path:
        return write_json_atomic(Path(directory) / CONFIG_NAME, self.to_dict())

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SpeechLMConfig:
        return cls.from_dict(read_json_object(Path(directory) / CONFIG_NAME, "speech LM config"))


def write_json_atomic(path: Path, data: dict) -> Path:
    """Write ``data`` as indented JSON to ``path`` via a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_json_object(path: Path, what: str) -> dict:
    """A JSON object from ``path``; SpeechLMError naming ``what`` when unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SpeechLMError(f"cannot read {what} {path}: {e}") from None
    if not isinstance(data, dict):
        raise SpeechLMError(f"{what} {path} is not a JSON object")
    return data
