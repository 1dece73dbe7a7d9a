"""Full duplex: Moshi-style multistream modelling on top of :class:`SpeechLM`, one LM position per frame.

Three time-aligned streams at the codec frame rate (25 Hz): the USER's audio (what the model
hears), the MODEL's audio (what it says; the empty code C where it is silent) and the model's
TEXT (its inner monologue: word pieces where its words start, ``<|text_pad|>`` elsewhere).
Position t reads everything known when frame t must be produced and predicts the model's
text token and audio frame t::

    input_t  = text_embed(text[t-1]) + audio_embed(model[t-1]) + user_embed(user[t])
    h_t      = backbone(input_0 .. input_t)                          (causal, KV-cached)
    text[t]  ~ lm_head(h_t)                                          text first ...
    model[t] ~ audio_head(h_t + text_condition(text[t]))             ... then audio (inner monologue)

At t = 0 the "previous" text token is ``<|duplex|>`` (stream start) and the previous frame is
all-empty. ``audio_embed`` / ``audio_head`` are the SpeechLM's own (so the model's voice keeps
what the earlier stages taught); ``user_embed`` is a second set of Q codebook tables, initialised
as a copy of ``audio_embed`` (the backbone already reads audio through those from ASR/chat
training). ``text_condition`` = zero-initialised ``Linear(RMSNorm(text_embed(token)))``: the audio
head starts exactly as the SpeechLM's and learns to read the chosen text token (Moshi conditions
its depformer on the text token the same way).

Silence. The model is silent in frame f when codebook 0 of f is the empty code; generation then
forces the frame's other codebooks to empty (and forbids empty in a frame that speaks), so a
frame is either all-empty or all codes. With the ``parallel_delay`` head the model stream is
stored delayed (codebook q at position t holds frame t - d_q) and a frame is complete d_max
positions after its codebook 0; :meth:`DuplexLM.step` returns the frame completed at this tick.

Losses (``forward``, teacher-forced on aligned streams (B, T)): text cross-entropy at every
position, ``<|text_pad|>`` targets weighted by ``text_pad_weight``; audio cross-entropy at every
position and codebook, codes where the model is silent (empty) weighted by
``silence_audio_weight`` — except codebook 0 in the ``stop_frames`` frames right after the model's
speech ends (an interruption's yield, a turn's end), weighted by ``stop_weight``: those few
targets decide how fast the model falls silent when the user barges in, and at the silence
weight they are cheap to miss. MCTP modules are not used: a duplex tick needs exactly one frame.

Incremental decoding (:meth:`DuplexLM.step`): every row advances one position per tick, so all
rows share one step count. The KV cache is a ring of ``window`` slots per layer (default 750 =
30 s), allocated once per state: tick n writes every row's keys and values into slot n mod
``window`` in place, so a step costs the same at minute 10 as at second 1 and per-session memory
is fixed (``window`` x layers x 2 x kv_heads x head_dim values). Attention is over the filled
slots with a per-row mask ``valid`` (B, window); slot order does not matter (each key carries
its own rotary position). Policies:

* reset (a new session in a row): the row's slots become invalid and its rotary positions
  restart at 0; attention is relative (RoPE), so the row then computes what a fresh single-row
  run computes (up to float rounding);
* window: each row sees its last ``window`` frames (the slot written now held the frame from
  ``window`` ticks ago); rotary positions keep counting, which RoPE's relative attention does
  not notice.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from speechlm.codec.errors import SpeechLMError
from speechlm.codec.model import row_mask

from .config import read_json_object, write_json_atomic
from .generate import GREEDY, Sampling, sample_codebooks, sample_logits
from .heads import AudioEmbedding
from .model import SpeechLM, check_codes, check_token_ids

DUPLEX_CONFIG_NAME = "duplex_config.json"
DUPLEX_WEIGHTS_NAME = "duplex.safetensors"
DUPLEX_FORMAT_VERSION = 1


@dataclass
class DuplexConfig:
    """What :class:`DuplexLM` adds to a SpeechLM; saved as ``duplex_config.json``."""

    text_pad_weight: float = 0.5  # weight of <|text_pad|> text targets (Moshi: 0.5)
    silence_audio_weight: float = 0.25  # weight of empty-code audio targets (frames where the model is silent)
    stop_weight: float | None = None  # codebook-0 empty targets in the first stop_frames silent frames (None: silence_audio_weight)
    stop_frames: int = 5
    text_loss_weight: float = 1.0
    audio_loss_weight: float = 1.0
    text_condition: bool = True  # the audio head reads the text token chosen at the same position
    text_lead: int = 0  # training data: a word's text starts this many frames before its speech
    window: int = 750  # KV-cache positions kept during incremental decoding (30 s at 25 Hz)
    format_version: int = DUPLEX_FORMAT_VERSION

    def __post_init__(self) -> None:
        problems = []
        weights = (self.text_pad_weight, self.silence_audio_weight, self.text_loss_weight, self.audio_loss_weight)
        if min(weights) < 0 or (self.stop_weight is not None and self.stop_weight < 0):
            problems.append("loss weights must be >= 0")
        if self.stop_frames < 1:
            problems.append(f"stop_frames must be >= 1, got {self.stop_frames}")
        if self.text_lead < 0:
            problems.append(f"text_lead must be >= 0, got {self.text_lead}")
        if self.window < 2:
            problems.append(f"window must be >= 2 positions, got {self.window}")
        if problems:
            raise SpeechLMError("invalid duplex config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DuplexConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpeechLMError(f"unknown duplex config field(s): {', '.join(unknown)}")
        if data.get("format_version", DUPLEX_FORMAT_VERSION) > DUPLEX_FORMAT_VERSION:
            raise SpeechLMError(f"duplex config format {data['format_version']} is newer than this speechlm understands; upgrade speechlm")
        return cls(**data)

    def save(self, directory: str | os.PathLike) -> Path:
        return write_json_atomic(Path(directory) / DUPLEX_CONFIG_NAME, self.to_dict())

    @classmethod
    def load(cls, directory: str | os.PathLike) -> DuplexConfig:
        return cls.from_dict(read_json_object(Path(directory) / DUPLEX_CONFIG_NAME, "duplex config"))


def is_duplex_dir(directory: str | os.PathLike) -> bool:
    """True for a directory written by :meth:`DuplexLM.save_pretrained`."""
    return (Path(directory) / DUPLEX_CONFIG_NAME).is_file()


@dataclass
class DuplexOutput:
    """What :meth:`DuplexLM.forward` returns (``mctp_losses`` is always empty; kept for the LM trainer)."""

    loss: Tensor
    text_loss: Tensor
    audio_loss: Tensor
    text_logits: Tensor  # (B, T, V)
    audio_logits: Tensor  # (N, Q, C+1) at the N attended positions, row-major over (B, T)
    audio_targets: Tensor  # (N, Q) the model stream in the head's layout
    hidden: Tensor  # (B, T, D)
    mctp_losses: list[Tensor] = field(default_factory=list)


@dataclass
class DuplexState:
    """Incremental decoding state of B rows (sessions); every tensor has the batch on dim 0.

    ``keys`` / ``values``: per backbone layer (B, kv_heads, window, head_dim), a ring of slots
    shared by all rows and written in place by :meth:`DuplexLM.step` (so a state is consumed by
    the step that takes it). ``valid`` (B, window): slots the row may attend to. ``steps``: ticks
    taken by the batch (the next write goes to slot ``steps % window``). ``positions`` (B,):
    rotary position (= frames since the row's reset) of the next step. ``prev_text`` (B,),
    ``prev_codes`` (B, Q): the row's outputs at the previous position (its next input).
    ``history`` (B, d_max, Q): the last d_max positions' codes (parallel head only).
    """

    keys: list[Tensor]
    values: list[Tensor]
    valid: Tensor
    positions: Tensor
    prev_text: Tensor
    prev_codes: Tensor
    history: Tensor
    steps: int = 0

    @property
    def batch_size(self) -> int:
        return int(self.positions.shape[0])

    @property
    def window(self) -> int:
        return int(self.valid.shape[1])

    @property
    def cache_length(self) -> int:
        """Slots filled so far (positions a row could attend to before this tick's)."""
        return min(self.steps, self.window)


class _RingCache:
    """What the transformers backbone sees as its KV cache during one :meth:`DuplexLM.step`:
    ``update`` writes the new position's keys/values into ``slot`` (a 1-element long tensor) of
    each layer's ring and returns the whole ring. Used with an explicit 4-D attention mask and
    explicit position ids, the backbone asks nothing else of it."""

    def __init__(self, keys: list[Tensor], values: list[Tensor], slot: Tensor):
        self.keys, self.values, self.slot = keys, values, slot

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k.index_copy_(2, self.slot, key_states[:, :, -1:].to(k.dtype))
        v.index_copy_(2, self.slot, value_states[:, :, -1:].to(v.dtype))
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.keys[layer_idx].shape[2])


class _GraphedBackbone:
    """The backbone's one-position forward over the KV ring with static buffers, replayed from a CUDA
    graph on CUDA (one capture per batch size and ring storage: ~1 000 kernel launches become one
    replay); on other devices the same buffers are simply run (what the tests check).

    A graph is tied to the addresses of the ring it was captured on; a state whose ring lives
    elsewhere (a new state, one grown or cut by the scheduler) gets its own capture. The last
    ``max_graphs`` captures are kept.
    """

    def __init__(self, lm: SpeechLM, max_graphs: int = 8):
        self.lm, self.max_graphs = lm, max_graphs
        self.entries: dict[tuple, dict[str, Any]] = {}
        self.captures = 0

    def __call__(self, embeds: Tensor, mask: Tensor, positions: Tensor, keys: list[Tensor], values: list[Tensor], slot: int) -> Tensor:
        """embeds (B, 1, D), mask (B, 1, 1, W) bool, positions (B, 1) -> hidden (B, D) (a static buffer: use it before the next call)."""
        key = (tuple(embeds.shape), embeds.dtype, *(t.data_ptr() for t in keys), *(t.data_ptr() for t in values))
        entry = self.entries.get(key)
        if entry is None:
            entry = self._build(embeds, mask, positions, keys, values)
            while len(self.entries) >= self.max_graphs:
                self.entries.pop(next(iter(self.entries))).clear()  # frees its graph now (the entry's closure is a cycle)
            self.entries[key] = entry
        entry["embeds"].copy_(embeds)
        entry["mask"].copy_(mask)
        entry["positions"].copy_(positions)
        entry["slot"].fill_(slot)
        if entry["graph"] is not None:
            entry["graph"].replay()
        else:
            entry["hidden"] = entry["run"]()
        return entry["hidden"]

    def _build(self, embeds, mask, positions, keys, values) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "embeds": embeds.clone(),
            "mask": mask.clone(),
            "positions": positions.clone(),
            "slot": torch.zeros(1, dtype=torch.long, device=embeds.device),
            "graph": None,
        }

        def run() -> Tensor:
            cache = _RingCache(keys, values, entry["slot"])
            out = self.lm.run_backbone(entry["embeds"], attention_mask=entry["mask"], position_ids=entry["positions"], past_key_values=cache)
            return out.last_hidden_state[:, 0]

        entry["run"] = run
        if embeds.device.type == "cuda":
            # Warm-up on a side stream (as CUDA graphs require), then capture. The warm-up writes the
            # ring slot this tick writes anyway, with the same inputs (the caller fills them next).
            entry["embeds"].copy_(embeds)
            stream = torch.cuda.Stream(device=embeds.device)
            stream.wait_stream(torch.cuda.current_stream(embeds.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    run()
            torch.cuda.current_stream(embeds.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # No garbage collection inside the capture: freeing another graph there breaks it. thread_local:
            # the server captures in its model thread while the event loop's thread may touch CUDA.
            gc.collect()
            gc.disable()
            try:
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    entry["hidden"] = run()
            finally:
                gc.enable()
            entry["graph"] = graph
            self.captures += 1
        return entry


@dataclass
class DuplexStep:
    """One tick of :meth:`DuplexLM.step` for B rows."""

    text: Tensor  # (B,) the model's text token at this position (<|text_pad|> when it says nothing new)
    codes: Tensor  # (B, Q) codes of this position, in the head's layout
    frame: Tensor  # (B, Q) the frame completed at this tick (all empty = silent)
    text_logits: Tensor  # (B, V) raw
    audio_logits: Tensor  # (B, Q, C+1) raw (as sampled; teacher-forced when codes were given)
    state: DuplexState


class TextCondition(nn.Module):
    """text token embedding -> an offset added to the hidden state the audio head reads; starts at zero."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=eps)
        self.proj = nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, text_embeds: Tensor) -> Tensor:
        return self.proj(self.norm(text_embeds))


class DuplexLM(nn.Module):
    """A :class:`SpeechLM` run as a full-duplex multistream model (see the module docstring).

    Build one with ``DuplexLM(SpeechLM.from_pretrained(dir))`` (fresh user embedding and text
    condition) or :meth:`from_pretrained` (a directory written by :meth:`save_pretrained`).
    """

    def __init__(self, lm: SpeechLM, config: DuplexConfig | None = None, *, init_user_from_audio: bool = True):
        super().__init__()
        self.lm = lm
        self.config = config or DuplexConfig()
        c = lm.config
        self.user_embedding = AudioEmbedding(
            num_codebooks=c.num_codebooks, codebook_size=c.codebook_size, dim=lm.hidden_size, scale=lm.audio_embedding.scale
        )
        if init_user_from_audio:
            self.user_embedding.load_state_dict(lm.audio_embedding.state_dict())
        eps = float(getattr(lm.backbone.config, "rms_norm_eps", 1e-6))
        self.text_condition = TextCondition(lm.hidden_size, eps) if self.config.text_condition else None
        v = lm.vocab
        self.start_token = v.tasks.get("<|duplex|>", v.bos)
        rows = lm.backbone.get_output_embeddings().weight.shape[0]
        allowed = torch.zeros(rows, dtype=torch.bool)
        allowed[: v.size] = True
        special = [v.speech_start, v.speech_end, v.audio, v.end_of_turn, v.bos, v.eos, v.pad, *v.roles.values(), *v.tasks.values()]
        allowed[special] = False
        allowed[v.text_pad] = True
        self.register_buffer("allowed_text", allowed, persistent=False)
        self.register_buffer("delays", torch.tensor(c.audio_delays, dtype=torch.long), persistent=False)
        self.graphs: _GraphedBackbone | None = None
        self.to(device=lm.device, dtype=lm.backbone.dtype)  # the new modules where the SpeechLM is

    def use_graphs(self, enabled: bool = True) -> DuplexLM:
        """Run :meth:`step`'s backbone forward from static buffers, captured as CUDA graphs on CUDA
        (capture on the first step of each batch size; move the model to its device first)."""
        self.graphs = _GraphedBackbone(self.lm) if enabled else None
        return self

    # -- properties ----------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.lm.device

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    @property
    def vocab(self):
        return self.lm.vocab

    @property
    def text_pad(self) -> int:
        return self.lm.vocab.text_pad

    @property
    def num_codebooks(self) -> int:
        return self.lm.config.num_codebooks

    @property
    def empty_code(self) -> int:
        return self.lm.config.empty_code

    @property
    def max_delay(self) -> int:
        return self.lm.config.max_delay

    # -- pieces ----------------------------------------------------------------------------

    def layout(self, frames: Tensor) -> Tensor:
        """Model-stream frames (B, T, Q) -> codes of the positions in the head's layout (B, T, Q):
        codebook q at position t holds frame t - d_q (empty before the stream starts)."""
        if self.max_delay == 0:
            return frames
        T = frames.shape[1]
        out = torch.full_like(frames, self.empty_code)
        for q, d in enumerate(self.lm.config.audio_delays):
            if d < T:
                out[:, d:, q] = frames[:, : T - d, q]
        return out

    def embed_inputs(self, prev_text: Tensor, prev_codes: Tensor, user_codes: Tensor) -> Tensor:
        """(B, L) previous text tokens, (B, L, Q) previous model codes, (B, L, Q) user codes -> (B, L, D)."""
        embeds = self.lm.backbone.get_input_embeddings()(prev_text)
        return embeds + self.lm.audio_embedding(prev_codes).to(embeds.dtype) + self.user_embedding(user_codes).to(embeds.dtype)

    def audio_input(self, hidden: Tensor, text: Tensor) -> Tensor:
        """What the audio head reads: the hidden state plus (if enabled) the chosen text token."""
        if self.text_condition is None:
            return hidden
        return hidden + self.text_condition(self.lm.backbone.get_input_embeddings()(text)).to(hidden.dtype)

    def set_stage(self, stage: str = "duplex") -> list[str]:
        """Train everything but the MCTP modules (unused in duplex); returns the trainable names."""
        if stage != "duplex":
            raise SpeechLMError(f"a DuplexLM trains in stage 'duplex', not {stage!r}")
        self.requires_grad_(True)
        self.lm.mctp.requires_grad_(False)
        return [name for name, p in self.named_parameters() if p.requires_grad]

    # -- training ------------------------------------------------------------------------

    def forward(
        self,
        user_codes: Tensor,
        model_codes: Tensor,
        text: Tensor,
        attention_mask: Tensor | None = None,
        *,
        all_losses: bool = False,
    ) -> DuplexOutput:
        """Teacher-forced losses on aligned streams.

        user_codes (B, T, Q) in [0, C]; model_codes (B, T, Q) frames, the empty code C where the
        model is silent; text (B, T) the model's text token per frame (``<|text_pad|>`` where none);
        attention_mask (B, T) bool, False at right padding. ``all_losses`` is accepted for the LM
        trainer (every loss is always computed).
        """
        del all_losses
        user_codes, model_codes, text, attention_mask = self._check(user_codes, model_codes, text, attention_mask)
        B, T, Q = model_codes.shape
        cfg = self.config
        layout = self.layout(model_codes)
        prev_text = torch.cat((torch.full_like(text[:, :1], self.start_token), text[:, :-1]), dim=1)
        prev_codes = torch.cat((torch.full_like(layout[:, :1], self.empty_code), layout[:, :-1]), dim=1)
        embeds = self.embed_inputs(prev_text, prev_codes, user_codes)
        positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        hidden = self.lm.run_backbone(embeds, attention_mask=attention_mask, position_ids=positions).last_hidden_state

        text_logits = self.lm.text_logits(hidden)
        text_ce = F.cross_entropy(text_logits.flatten(0, 1).float(), text.flatten(), reduction="none").view(B, T)
        text_w = torch.where(text == self.text_pad, cfg.text_pad_weight, 1.0) * attention_mask
        text_loss = (text_ce * text_w).sum() / text_w.sum().clamp(min=1e-6)

        rows = attention_mask.flatten()
        targets = layout.flatten(0, 1)[rows]  # (N, Q)
        audio_in = self.audio_input(hidden, text).flatten(0, 1)[rows]
        audio_logits = self.lm.audio_head(audio_in, targets)  # (N, Q, C+1)
        audio_ce = F.cross_entropy(audio_logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view_as(targets)
        audio_w = torch.where(targets == self.empty_code, cfg.silence_audio_weight, 1.0)
        if cfg.stop_weight is not None:
            stops = self.stop_mask(layout[..., 0]).flatten()[rows]  # (N,)
            audio_w[:, 0] = torch.where(stops, cfg.stop_weight, audio_w[:, 0])
        if self.lm.config.codebook_loss_weights is not None:
            audio_w = audio_w * torch.tensor(self.lm.config.codebook_loss_weights, device=audio_w.device)
        audio_loss = (audio_ce * audio_w).sum() / audio_w.sum().clamp(min=1e-6)

        loss = cfg.text_loss_weight * text_loss + cfg.audio_loss_weight * audio_loss
        return DuplexOutput(loss, text_loss, audio_loss, text_logits, audio_logits, targets, hidden)

    def stop_mask(self, first_codebook: Tensor) -> Tensor:
        """(B, T) codebook 0 of the model's frames -> (B, T) bool: the first ``stop_frames``
        silent frames after a speaking frame (where the model must fall, and stay, silent)."""
        speaking = first_codebook != self.empty_code
        k = self.config.stop_frames
        # spoke[t] = any speaking frame in t-k .. t-1
        shifted = F.pad(speaking.float(), (k, 0))[:, :-1].unsqueeze(1)  # (B, 1, T + k - 1)
        spoke = F.max_pool1d(shifted, kernel_size=k, stride=1).squeeze(1)[:, : speaking.shape[1]] > 0
        return ~speaking & spoke

    def _check(self, user_codes, model_codes, text, attention_mask):
        if not isinstance(text, Tensor) or text.ndim != 2 or text.dtype.is_floating_point or text.numel() == 0:
            raise SpeechLMError(
                f"text must be a non-empty integer tensor (batch, frames), got {getattr(text, 'shape', type(text).__name__)}"
            )
        B, T = text.shape
        check_codes(user_codes, self.lm.config, leading=(B, T))
        check_codes(model_codes, self.lm.config, leading=(B, T))
        text = text.long().to(self.device)
        check_token_ids(text, self.lm.backbone.get_input_embeddings().weight.shape[0])
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.bool)
        elif tuple(attention_mask.shape) != (B, T):
            raise SpeechLMError(f"attention_mask must have shape {(B, T)}, got {tuple(attention_mask.shape)}")
        return user_codes.long().to(self.device), model_codes.long().to(self.device), text, attention_mask.to(self.device).bool()

    # -- incremental decoding ------------------------------------------------------------

    def init_state(self, batch_size: int) -> DuplexState:
        """Start-of-stream state for ``batch_size`` rows (the KV ring allocated, no slot valid)."""
        device, Q = self.device, self.num_codebooks
        bc = self.lm.backbone.config
        heads = int(getattr(bc, "num_key_value_heads", None) or bc.num_attention_heads)
        head_dim = int(getattr(bc, "head_dim", None) or bc.hidden_size // bc.num_attention_heads)
        shape = (batch_size, heads, self.config.window, head_dim)
        dtype = self.lm.backbone.dtype
        layers = int(bc.num_hidden_layers)
        return DuplexState(
            keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
            values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
            valid=torch.zeros(batch_size, self.config.window, dtype=torch.bool, device=device),
            positions=torch.zeros(batch_size, dtype=torch.long, device=device),
            prev_text=torch.full((batch_size,), self.start_token, dtype=torch.long, device=device),
            prev_codes=torch.full((batch_size, Q), self.empty_code, dtype=torch.long, device=device),
            history=torch.full((batch_size, self.max_delay, Q), self.empty_code, dtype=torch.long, device=device),
        )

    def reset_rows(self, state: DuplexState, rows) -> DuplexState:
        """Rows (indices or a (B,) bool mask) restart their stream; the others are untouched. Returns a new state."""
        mask = row_mask(rows, state.batch_size, state.positions.device)
        if not bool(mask.any()):
            return state
        return replace(
            state,
            valid=state.valid & ~mask[:, None],
            positions=state.positions.masked_fill(mask, 0),
            prev_text=state.prev_text.masked_fill(mask, self.start_token),
            prev_codes=state.prev_codes.masked_fill(mask[:, None], self.empty_code),
            history=state.history.masked_fill(mask[:, None, None], self.empty_code),
        )

    def grow_state(self, state: DuplexState, batch_size: int) -> DuplexState:
        """``state`` with fresh rows appended up to ``batch_size`` (no slot valid for them)."""
        n = batch_size - state.batch_size
        if n <= 0:
            return state
        fresh = self.init_state(n)
        return DuplexState(
            keys=[torch.cat((k, f)) for k, f in zip(state.keys, fresh.keys)],
            values=[torch.cat((v, f)) for v, f in zip(state.values, fresh.values)],
            valid=torch.cat((state.valid, fresh.valid)),
            positions=torch.cat((state.positions, fresh.positions)),
            prev_text=torch.cat((state.prev_text, fresh.prev_text)),
            prev_codes=torch.cat((state.prev_codes, fresh.prev_codes)),
            history=torch.cat((state.history, fresh.history)),
            steps=state.steps,
        )

    def select_rows(self, state: DuplexState, rows: list[int]) -> DuplexState:
        """The sub-batch made of ``rows`` in that order."""
        index = torch.as_tensor(rows, dtype=torch.long, device=state.positions.device)
        return DuplexState(
            keys=[k.index_select(0, index) for k in state.keys],
            values=[v.index_select(0, index) for v in state.values],
            valid=state.valid.index_select(0, index),
            positions=state.positions.index_select(0, index),
            prev_text=state.prev_text.index_select(0, index),
            prev_codes=state.prev_codes.index_select(0, index),
            history=state.history.index_select(0, index),
            steps=state.steps,
        )

    @torch.no_grad()
    def step(
        self,
        user_codes: Tensor,
        state: DuplexState,
        *,
        text_sampling: Sampling = GREEDY,
        audio_sampling: Sampling = GREEDY,
        generator: torch.Generator | None = None,
        text: Tensor | None = None,
        codes: Tensor | None = None,
        text_filter: Callable[[Tensor], Tensor] | None = None,
    ) -> DuplexStep:
        """One position for every row: user_codes (B, Q) of this frame -> the model's text token and codes.

        ``text`` (B,) / ``codes`` (B, Q) teacher-force the outputs instead of sampling them (the
        logits are then those of the training forward). ``text_filter`` maps the sampled text
        tokens (B,) to the ones the model says (B,) before its audio is chosen: a caller steers
        the inner monologue with it (see :mod:`speechlm.streaming.assist`). Rows sample jointly: with a random
        ``Sampling`` a row's draws depend on the batch; greedy decoding does not.
        """
        B, Q = state.batch_size, self.num_codebooks
        check_codes(user_codes, self.lm.config, leading=(B,))
        user_codes = user_codes.long().to(self.device)
        if state.window != self.config.window or len(state.keys) != self.lm.backbone.config.num_hidden_layers:
            raise SpeechLMError(f"this state's KV ring has {state.window} slots, the model's window is {self.config.window}: use init_state")
        embeds = self.embed_inputs(state.prev_text[:, None], state.prev_codes[:, None], user_codes[:, None])
        # Attention always spans the whole ring (unfilled slots masked): a tick costs the same at
        # second 1 as at minute 10, and every tick has the same shapes.
        slot = state.steps % state.window
        valid = state.valid.clone()
        valid[:, slot] = True
        mask = valid[:, None, None, :]  # (B, 1, 1, window): a ready-made 4-D mask, which the backbone uses as is
        if self.graphs is not None:
            hidden = self.graphs(embeds, mask, state.positions[:, None], state.keys, state.values, slot)
        else:
            cache = _RingCache(state.keys, state.values, torch.tensor([slot], device=embeds.device))
            output = self.lm.run_backbone(embeds, attention_mask=mask, position_ids=state.positions[:, None], past_key_values=cache)
            hidden = output.last_hidden_state[:, 0]

        text_logits = self.lm.text_logits(hidden)
        if text is None:
            masked = text_logits.float().masked_fill(~self.allowed_text, float("-inf"))
            text = sample_logits(masked, text_sampling, generator)
            if text_filter is not None:
                text = text_filter(text).long().to(self.device).view(B)
                check_token_ids(text, self.allowed_text.shape[0])
        else:
            text = text.long().to(self.device).view(B)
            check_token_ids(text, self.allowed_text.shape[0])
        audio_in = self.audio_input(hidden, text)
        if codes is None:
            chooser = _AudioChooser(self, state, audio_sampling, generator)
            codes = self.lm.audio_head.generate(audio_in, chooser)
            audio_logits = torch.cat(chooser.logits, dim=1)
        else:
            check_codes(codes, self.lm.config, leading=(B,))
            codes = codes.long().to(self.device)
            audio_logits = self.lm.audio_head(audio_in, codes)

        window = torch.cat((state.history, codes[:, None]), dim=1)  # (B, d_max + 1, Q): positions t - d_max .. t
        frame = window[:, self.delays, torch.arange(Q, device=window.device)]  # codebook q of frame t - d_max sits at index d_q
        new_state = DuplexState(
            keys=state.keys,
            values=state.values,
            valid=valid,
            positions=state.positions + 1,
            prev_text=text,
            prev_codes=codes,
            history=window[:, 1:],
            steps=state.steps + 1,
        )
        return DuplexStep(text=text, codes=codes, frame=frame, text_logits=text_logits, audio_logits=audio_logits, state=new_state)

    # -- files -----------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """The SpeechLM's files (so the directory also loads as a SpeechLM) plus ``duplex_config.json``
        and ``duplex.safetensors`` (user embedding, text condition)."""
        directory = Path(directory)
        self.lm.save_pretrained(directory)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items() if not name.startswith("lm.")}
        weights = directory / DUPLEX_WEIGHTS_NAME
        tmp = weights.with_name(f".{weights.name}.tmp{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"format": "speechlm-duplex"})
        os.replace(tmp, weights)
        self.config.save(directory)
        return directory

    def load_duplex_weights(self, directory: str | os.PathLike) -> None:
        """Load ``duplex.safetensors`` from ``directory`` (strict)."""
        weights = Path(directory) / DUPLEX_WEIGHTS_NAME
        if not weights.is_file():
            raise SpeechLMError(f"duplex weights not found: {weights}")
        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError) as e:
            raise SpeechLMError(f"cannot read duplex weights {weights} (corrupt or not safetensors): {e}") from None
        own = {name for name in self.state_dict() if not name.startswith("lm.")}
        if set(tensors) != own:
            raise SpeechLMError(
                f"duplex weights {weights} do not match its config: missing {sorted(own - set(tensors))[:5]}, "
                f"unexpected {sorted(set(tensors) - own)[:5]}"
            )
        try:
            self.load_state_dict(tensors, strict=False)
        except RuntimeError as e:
            raise SpeechLMError(f"duplex weights {weights} do not match its config: {str(e).splitlines()[0]}") from None

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> DuplexLM:
        """Load a directory written by :meth:`save_pretrained`; returns the model in eval mode."""
        directory = Path(directory)
        if not is_duplex_dir(directory):
            raise SpeechLMError(
                f"{directory} is not a duplex model directory: it has no {DUPLEX_CONFIG_NAME} (train one with --stage duplex)"
            )
        config = DuplexConfig.load(directory)
        lm = SpeechLM.from_pretrained(directory, dtype=dtype)
        model = cls(lm, config, init_user_from_audio=False)
        model.load_duplex_weights(directory)
        if dtype is not None:
            model = model.to(dtype)
        return model.to(device).eval()


class _AudioChooser:
    """Turns audio-head logits into codes for one position of every row (see ``heads.Chooser``).

    Codebook q at position t belongs to frame t - d_q. Before the stream start that frame does not
    exist (forced empty). Otherwise, once codebook 0 of the frame has been chosen (earlier, or
    just now), a silent frame forces the empty code and a speaking frame forbids it.
    """

    def __init__(self, model: DuplexLM, state: DuplexState, sampling: Sampling, generator):
        self.sampling, self.generator = sampling, generator
        self.empty = model.empty_code
        delays = model.delays
        self.back = delays - delays[0]  # positions back to codebook 0 of the same frame
        self.before_start = state.positions[:, None] < delays[None, :]  # (B, Q)
        M = model.max_delay
        # Silence of each codebook's frame where codebook 0 was chosen at an earlier position (history).
        self.known = self.back > 0
        index = (M - self.back).clamp(min=0, max=max(M - 1, 0))
        if M > 0:
            self.silent = state.history[:, index, 0] == self.empty  # (B, Q); meaningful where known
        else:
            self.silent = torch.zeros_like(self.before_start)
        self.logits: list[Tensor] = []

    def __call__(self, first_q: int, logits: Tensor) -> Tensor:
        self.logits.append(logits)
        B, n, classes = logits.shape
        logits = logits.float()
        qs = torch.arange(first_q, first_q + n, device=logits.device)
        is_empty_class = torch.arange(classes, device=logits.device) == self.empty
        codes = torch.empty(B, n, dtype=torch.long, device=logits.device)
        start = 0
        if first_q == 0:  # codebook 0 decides whether frame t - d_0 is silent
            codes[:, 0] = sample_codebooks(logits[:, :1], 0, self.sampling, self.generator)[:, 0]
            codes[:, 0] = codes[:, 0].masked_fill(self.before_start[:, 0], self.empty)
            same = self.back == 0
            self.silent = torch.where(same[None, :], (codes[:, :1] == self.empty).expand(B, -1), self.silent)
            self.known = self.known | same
            start = 1
        if start < n:
            rest = qs[start:]
            known = self.known[rest][None, :].expand(B, -1)
            silent = self.silent[:, rest] & known
            speaking = ~self.silent[:, rest] & known
            part = logits[:, start:].masked_fill(speaking[..., None] & is_empty_class, float("-inf"))
            sampled = sample_codebooks(part, first_q + start, self.sampling, self.generator)
            codes[:, start:] = sampled.masked_fill(silent | self.before_start[:, rest], self.empty)
        return codes
