"""The full-duplex speech model the server drives: codec encode -> one DuplexLM step -> codec decode.

Per tick, for every row (session) at once::

    user pcm (B, 640) ──codec.encode_step──► user codes (B, Q)
        ──DuplexLM.step──► the model's text token (B,) and frame (B, Q)
        ──codec.decode_step──► model pcm (B, 640)

A frame whose codebook 0 is the empty code is silence: its pcm is zeros and that row's
decoder state is reset, so when the model speaks again its decoder starts as at the start of
a stream (the decoder never sees the placeholder codes of silent frames). Text comes back as
decoded word pieces (``" hel"``, ``"lo"``; None for ``<|text_pad|>``).

Noise gate (``noise_gate``, on by default; :mod:`speechlm.streaming.gate`): the model was trained on
dialogues whose pauses are digital silence, and a room under the user's pauses kept it from ever
taking its turn; so once the user has been quiet a few frames their audio reaches it as zeros until
they speak again. With a speech detector (``speech_detector``, e.g. ``"vad-en"``; the server's default, ``speechlm
serve --gate-detector``) the gate also asks it, frame by frame, whether a sound over its level threshold is speech:
a room louder than the gate's ceiling (-40 dBFS) no longer keeps the user talking forever.

State (:class:`DuplexSpeechState`): the codec's encoder and decoder halves, the noise gate's per-row
level and floor (and its speech detector's caches, ~33 KB a row), and the LM's :class:`speechlm.lm.duplex.DuplexState`. Rows join and leave through ``grow_state`` /
``select_rows`` (the LM's KV cache is a ring of ``window`` slots shared by all rows: a new row's
slots start invalid). Memory per session is fixed by the LM's ``window``.

Sampling: Moshi's defaults (text temperature 0.7, top-k 25; audio 0.8, top-k 250); pass
``GREEDY`` for repeatable output. ``graphs=True`` replays the LM backbone's forward from CUDA
graphs on a GPU (``speechlm serve --cuda-graphs``). With sampling, rows draw from one generator, so a session's
draws depend on who else is in the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..codec.errors import SpeechLMError
from ..codec.model import Codec, CodecState
from ..lm.duplex import DuplexLM, DuplexState
from ..lm.generate import Sampling
from ..vad import STREAM_HOP, SpeechDetector
from .gate import GateConfig, GateState, noise_gate, talking
from .models import TextPiece, concat_states, select_rows

TEXT_SAMPLING = Sampling(temperature=0.7, top_k=25)
AUDIO_SAMPLING = Sampling(temperature=0.8, top_k=250)
NOISE_GATE = GateConfig()


@dataclass
class DuplexSpeechState:
    encoder: CodecState  # only its encoder half is used
    decoder: CodecState  # only its decoder half is used
    lm: DuplexState
    gate: GateState  # the noise gate's per-row level, floor and runs

    @property
    def batch_size(self) -> int:
        return self.lm.batch_size


@dataclass
class DuplexTick:
    """One :meth:`DuplexSpeechModel.tick` for B rows."""

    pcm: Tensor  # (B, frame_length) the model's audio (zeros where silent)
    text: Tensor  # (B,) the model's text token ids (``<|text_pad|>`` = no new text)
    silent: Tensor  # (B,) bool: the frame is silence (codebook 0 empty)
    state: DuplexSpeechState


class DuplexSpeechModel:
    """:class:`speechlm.streaming.models.DuplexModel` backed by a :class:`DuplexLM` and a streaming codec."""

    def __init__(
        self,
        lm: DuplexLM,
        codec: Codec,
        *,
        device: str | torch.device | None = None,
        text_sampling: Sampling = TEXT_SAMPLING,
        audio_sampling: Sampling = AUDIO_SAMPLING,
        seed: int | None = 0,
        graphs: bool = False,
        noise_gate: GateConfig | None = NOISE_GATE,
        speech_detector: SpeechDetector | str | None = None,
    ):
        cfg = lm.lm.config
        if codec.config.codes_per_frame != cfg.num_codebooks or codec.config.codebook_size != cfg.codebook_size:
            raise SpeechLMError(
                f"the codec makes {codec.config.codes_per_frame} codes per frame from {codec.config.codebook_size}-entry codebooks, "
                f"but the duplex LM reads {cfg.num_codebooks} x {cfg.codebook_size}"
            )
        if float(codec.config.frame_rate) != float(cfg.frame_rate):
            raise SpeechLMError(f"the codec runs at {codec.config.frame_rate} frames/s but the duplex LM at {cfg.frame_rate}")
        if cfg.codec_id is not None and cfg.codec_id != codec.codec_id:
            raise SpeechLMError(f"the duplex LM was trained on codes of codec {cfg.codec_id}, not {codec.codec_id}")
        if device is not None:
            lm, codec = lm.to(device), codec.to(device)
        self.lm, self.codec = lm.eval(), codec.eval()
        self.lm.use_graphs(graphs)  # the LM's backbone forward from CUDA graphs (see DuplexLM.use_graphs)
        self.device = lm.device
        self.frame_length = int(codec.frame_length)
        self.sample_rate = int(codec.sample_rate)
        self.noise_gate = noise_gate  # None: the model hears the user's pauses as they are
        # the gate's speech detector (frame by frame on every row; None: the level alone)
        self.speech_detector = load_detector(speech_detector, self.device)
        if self.speech_detector is not None and self.frame_length % STREAM_HOP:
            raise SpeechLMError(f"the speech detector hears chunks of a multiple of {STREAM_HOP} samples, not frames of {self.frame_length}")
        self.text_sampling, self.audio_sampling = text_sampling, audio_sampling
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(int(seed))
        self.max_batch_seen = 0
        self._pieces: dict[int, str | None] = {lm.text_pad: None}

    @classmethod
    def from_pretrained(
        cls, lm_dir, codec, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **kwargs
    ) -> DuplexSpeechModel:
        """``lm_dir``: a directory from ``DuplexLM.save_pretrained``; ``codec``: a Codec, or its name/directory.
        ``dtype``: the LM's (the codec always runs in float32)."""
        from ..speech import resolve_model

        if not isinstance(codec, Codec):
            codec = Codec.from_pretrained(codec, device=device)
        lm = DuplexLM.from_pretrained(resolve_model(lm_dir), device=device, dtype=dtype)
        return cls(lm, codec, device=device, **kwargs)

    # -- state ---------------------------------------------------------------------------

    def init_state(self, batch_size: int) -> DuplexSpeechState:
        codec = self.codec
        return DuplexSpeechState(codec.init_state(batch_size), codec.init_state(batch_size), self.lm.init_state(batch_size),
                                 GateState.fresh(batch_size, self.device, self.speech_detector))  # fmt: skip

    def reset_rows(self, state: DuplexSpeechState, rows: list[int]) -> DuplexSpeechState:
        if len(rows) == 0:
            return state
        state.encoder.reset_rows(rows)
        state.decoder.reset_rows(rows)
        state.gate.reset_rows(rows)
        return DuplexSpeechState(state.encoder, state.decoder, self.lm.reset_rows(state.lm, rows), state.gate)

    def grow_state(self, state: DuplexSpeechState, batch_size: int) -> DuplexSpeechState:
        n = batch_size - state.batch_size
        if n <= 0:
            return state
        return DuplexSpeechState(
            concat_states(state.encoder, self.codec.init_state(n)),
            concat_states(state.decoder, self.codec.init_state(n)),
            self.lm.grow_state(state.lm, batch_size),
            concat_states(state.gate, GateState.fresh(n, self.device, self.speech_detector)),
        )

    def select_rows(self, state: DuplexSpeechState, rows: list[int]) -> DuplexSpeechState:
        return DuplexSpeechState(
            select_rows(state.encoder, rows), select_rows(state.decoder, rows), self.lm.select_rows(state.lm, rows), select_rows(state.gate, rows)
        )

    # -- the step --------------------------------------------------------------------------

    def step(self, user_pcm: Tensor, state: DuplexSpeechState) -> tuple[Tensor, list[TextPiece], DuplexSpeechState]:
        """user_pcm (B, frame_length) -> model pcm (B, frame_length), B text pieces (None = no new text), state.
        With a noise gate, a row's piece says when its user starts or stops talking (``{"model": piece, "events":
        [{"user": "started"}]}``, as the answer assist's do: the server's METADATA ``user``)."""
        before = talking(state.gate, self.noise_gate) if self.noise_gate is not None else None
        tick = self.tick(user_pcm, state)
        pieces: list[TextPiece] = [self.piece(int(t)) for t in tick.text.tolist()]
        if before is not None:  # per row 2 * talking before + talking now: 1 = started, 2 = stopped (one read of the device)
            change = (2 * before.long() + talking(tick.state.gate, self.noise_gate).long()).tolist()
            for b, c in enumerate(change):
                if c in (1, 2):
                    pieces[b] = {"model": pieces[b] or "", "events": [{"user": "started" if c == 1 else "stopped"}]}
        return tick.pcm, pieces, tick.state

    @torch.inference_mode()
    def listen(self, user_pcm: Tensor, state: DuplexSpeechState, config: GateConfig | None = None) -> tuple[Tensor, Tensor]:
        """The noise gate (``config``, default the model's own; it must not be None here): user_pcm
        (B, frame_length) -> (what the LM is to hear (B, frame_length) on the model's device, voiced (B,)
        bool). Updates ``state.gate``; :meth:`tick` calls it unless told ``gate=False``."""
        config = config or self.noise_gate
        if config is None:
            raise SpeechLMError("this duplex model has no noise gate (noise_gate=None): pass a GateConfig")
        pcm = user_pcm.to(self.device, torch.float32)
        return noise_gate(pcm, state.gate, config, self.frame_length / self.sample_rate, self.speech_detector)

    @torch.inference_mode()
    def tick(
        self, user_pcm: Tensor, state: DuplexSpeechState, text_filter: Callable[[Tensor], Tensor] | None = None, *, gate: bool = True,
        decode: bool = True,
    ) -> DuplexTick:
        """:meth:`step` with the details: the text token ids and which rows were silent.
        ``text_filter``: see :meth:`speechlm.lm.duplex.DuplexLM.step`. ``gate=False``: ``user_pcm`` is
        heard as given (a caller that ran :meth:`listen` itself); else through the model's noise gate, if any.
        ``decode=False``: the model's codes are not decoded (``pcm`` is silence, the decoder's state left as it
        was), for a caller that plays other audio (the answer assist's speech LM voice)."""
        batch = user_pcm.shape[0]
        self.max_batch_seen = max(self.max_batch_seen, batch)
        user_pcm = user_pcm.to(self.device, torch.float32)
        if gate and self.noise_gate is not None:
            user_pcm, _ = self.listen(user_pcm, state)
        user_codes, encoder = self.codec.encode_step(user_pcm, state.encoder)
        out = self.lm.step(
            user_codes, state.lm, text_sampling=self.text_sampling, audio_sampling=self.audio_sampling, generator=self.generator,
            text_filter=text_filter,
        )  # fmt: skip
        silent = out.frame[:, 0] == self.lm.empty_code
        if not decode:
            pcm = torch.zeros_like(user_pcm)
            return DuplexTick(pcm, out.text, silent, DuplexSpeechState(encoder, state.decoder, out.state, state.gate))
        codes = out.frame.masked_fill(silent[:, None], 0)  # placeholders; their audio is dropped
        pcm, decoder = self.codec.decode_step(codes, state.decoder)
        if bool(silent.any()):
            pcm = pcm.masked_fill(silent[:, None], 0.0)
            decoder.reset_rows(silent)
        return DuplexTick(pcm, out.text, silent, DuplexSpeechState(encoder, decoder, out.state, state.gate))

    def piece(self, token: int) -> str | None:
        """Text of one token (cached); None for ``<|text_pad|>``."""
        if token not in self._pieces:
            self._pieces[token] = self.lm.tokenizer.decode([token], skip_special_tokens=True) or None
        return self._pieces[token]


def load_detector(detector: SpeechDetector | str | None, device: str | torch.device) -> SpeechDetector | None:
    """A speech detector, or its name or directory, on ``device`` (float32, eval); None stays None."""
    if detector is None:
        return None
    if not isinstance(detector, SpeechDetector):
        detector = SpeechDetector.from_pretrained(detector)
    return detector.to(device=device, dtype=torch.float32).eval()


def build_duplex_model(lm_dir: str, codec: str, device: str = "cpu", **kwargs: Any) -> DuplexSpeechModel:
    """For ``speechlm serve --model duplex --lm DIR --codec NAME`` and the load test.

    ``lm_dir`` = ``random:PRESET`` (a key of :data:`BACKBONE_PRESETS`) builds an untrained duplex LM
    on that backbone shape, with the shipped default's vocabulary, heads and codec: for measuring
    what a bigger backbone costs per session, not for listening to."""
    if not lm_dir:
        raise SpeechLMError("--model duplex needs --lm DIR (a model trained with speechlm train lm --stage duplex)")
    if str(lm_dir).startswith("random:"):
        dtype = kwargs.pop("dtype", torch.float32)
        lm = random_duplex_lm(str(lm_dir).removeprefix("random:"), device=device, dtype=dtype)
        return DuplexSpeechModel(lm, Codec.from_pretrained(codec, device=device), device=device, **kwargs)
    return DuplexSpeechModel.from_pretrained(lm_dir, codec, device=device, **kwargs)


# Backbone shapes for capacity measurements (random weights). ``qwen2-0.5b`` is Qwen2-0.5B's
# (494 M parameters with its 151 936-token embedding, tied).
BACKBONE_PRESETS: dict[str, dict[str, Any]] = {
    "qwen2-0.5b": dict(
        model_type="qwen2",
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
    ),
    # for tests: the shipped default's vocabulary on a 2-layer backbone
    "tiny": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1408, tie_word_embeddings=True, max_position_embeddings=2048),
}


def random_duplex_lm(
    preset: str, *, like: str = "duplex-default", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> DuplexLM:
    """An untrained :class:`DuplexLM` on the backbone shape ``BACKBONE_PRESETS[preset]``, with the
    tokenizer, speech config (codebooks, heads, delays) and duplex config of the model ``like``."""
    from transformers import AutoConfig

    from ..lm.config import SpeechLMConfig
    from ..lm.duplex import DuplexConfig
    from ..lm.model import SpeechLM
    from ..lm.vocab import load_tokenizer
    from ..speech import resolve_model

    if preset not in BACKBONE_PRESETS:
        raise SpeechLMError(f"unknown backbone preset {preset!r}; known: {', '.join(BACKBONE_PRESETS)}")
    directory = resolve_model(like)
    fields = dict(BACKBONE_PRESETS[preset])
    backbone_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise where it runs: a 0.5B model's init on the CPU takes a while
        lm = SpeechLM.from_backbone(backbone_config, load_tokenizer(directory / "tokenizer"), SpeechLMConfig.load(directory))
        model = DuplexLM(lm, DuplexConfig.load(directory))
    return model.to(device=device, dtype=dtype).eval()
