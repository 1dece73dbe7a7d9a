"""The duplex step the server drives, and two stand-ins until the real duplex LM exists.

The contract (:class:`DuplexModel`) is one batched, frame-synchronous step::

    state = model.init_state(batch_size)
    state = model.reset_rows(state, [3])                  # row 3 starts a new session
    model_pcm, texts, state = model.step(user_pcm, state)  # (B, 640) -> (B, 640), B pieces of text

Every row is an independent session; the scheduler owns the rows. ``texts[i]`` is
``None`` (nothing this frame), a ``str`` (a piece of the model's own text), or a dict
``{"model": str, "user": str}`` when the model also transcribes the user.

Rows are added and removed by the scheduler without the model's help, through
:func:`concat_states` and :func:`select_rows`: a state must be a tree (dataclass,
list, tuple, dict) whose tensors all have the batch on dim 0. A model whose state
does not fit that may define ``grow_state(state, batch_size)`` and
``select_rows(state, rows)`` itself.

Two implementations ship here:

* :class:`EchoCodecModel` — a real batched codec loopback: encodes the user's frame and
  decodes it back one frame later (the lag a duplex LM has), no text. For latency and
  load tests: it costs what the codec half of a duplex model costs.
* :class:`SilenceModel` — returns zeros; protocol tests without weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

TextPiece = str | dict[str, str] | None


@runtime_checkable
class DuplexModel(Protocol):
    """One full-duplex step per frame for a batch of independent sessions."""

    frame_length: int  # samples per frame (640 at 16 kHz / 25 Hz)
    sample_rate: int  # 16000

    def init_state(self, batch_size: int) -> Any:
        """Start-of-stream state for ``batch_size`` rows."""
        ...

    def reset_rows(self, state: Any, rows: list[int]) -> Any:
        """Return ``rows`` to the start-of-stream state; other rows are untouched."""
        ...

    def step(self, user_pcm: Tensor, state: Any) -> tuple[Tensor, list[TextPiece], Any]:
        """user_pcm: (B, frame_length) float32 in [-1, 1] -> model pcm (B, frame_length), B text pieces, new state."""
        ...


# -- batch-state surgery (rows join and leave without re-creating the batch) -------------


def _map(fn, *trees):
    """Apply ``fn`` to the tensors at the same place in ``trees``; rebuild the containers."""
    first = trees[0]
    if isinstance(first, Tensor):
        return fn(*trees)
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        changes = {f.name: _map(fn, *(getattr(t, f.name) for t in trees)) for f in dataclasses.fields(first) if f.init}
        return dataclasses.replace(first, **changes)
    if isinstance(first, (list, tuple)):
        items = [_map(fn, *parts) for parts in zip(*trees)]
        return type(first)(items) if not hasattr(first, "_fields") else type(first)(*items)
    if isinstance(first, dict):
        return {key: _map(fn, *(t[key] for t in trees)) for key in first}
    return first  # ints, strings, None: not per-row


def concat_states(a: Any, b: Any) -> Any:
    """Stack two batch states: rows of ``a`` then rows of ``b`` (every tensor on dim 0)."""
    return _map(lambda x, y: torch.cat([x, y], dim=0), a, b)


def select_rows(state: Any, rows: list[int]) -> Any:
    """The sub-batch made of ``rows``, in that order."""
    index = None

    def pick(t: Tensor) -> Tensor:
        nonlocal index
        if index is None or index.device != t.device:
            index = torch.as_tensor(rows, dtype=torch.long, device=t.device)
        return t.index_select(0, index)

    return _map(pick, state)


def grow_state(model: DuplexModel, state: Any, batch_size: int) -> Any:
    """``state`` with fresh rows appended up to ``batch_size`` rows in all."""
    current = state_batch_size(state)
    if batch_size <= current:
        return state
    if hasattr(model, "grow_state"):
        return model.grow_state(state, batch_size)
    return concat_states(state, model.init_state(batch_size - current))


def shrink_state(model: DuplexModel, state: Any, rows: list[int]) -> Any:
    """Keep only ``rows`` (in that order): row ``rows[i]`` becomes row ``i``."""
    if hasattr(model, "select_rows"):
        return model.select_rows(state, rows)
    return select_rows(state, rows)


def state_batch_size(state: Any) -> int:
    """Rows in a state (the dim 0 of its first tensor); a model may expose ``batch_size`` instead."""
    if hasattr(state, "batch_size"):
        return int(state.batch_size)
    found: list[int] = []
    _map(lambda t: found.append(t.shape[0]) or t, state)
    if not found:
        raise TypeError(f"cannot find the batch size of a {type(state).__name__}: it holds no tensors")
    return found[0]


# -- stand-ins ------------------------------------------------------------------------------


@dataclass
class EchoState:
    """Encoder and decoder halves of the codec state kept apart, so that a row's decoder
    starts exactly when its first codes exist (the streaming output then equals the
    offline roundtrip, shifted by one frame)."""

    encoder: Any  # CodecState (only its encoder half is used)
    decoder: Any  # CodecState (only its decoder half is used)
    previous_codes: Tensor  # (B, G*R) codes of the last frame heard
    has_previous: Tensor  # (B,) bool: previous_codes holds real codes

    @property
    def batch_size(self) -> int:
        return self.has_previous.shape[0]


class EchoCodecModel:
    """Codec loopback: model pcm at frame t = decode(encode(user pcm at frame t-1)); no text.

    Frame 0 of each session is silence. Batched: one ``encode_step`` and one ``decode_step``
    for all rows per call.
    """

    def __init__(self, codec, device: str | torch.device | None = None):
        self.codec = codec if device is None else codec.to(device)
        self.codec.eval()
        self.frame_length = int(codec.frame_length)
        self.sample_rate = int(codec.sample_rate)
        self.device = next(codec.parameters()).device
        self.codes_per_frame = int(codec.config.codes_per_frame)
        self.max_batch_seen = 0  # for tests and stats: the largest batch one step ran

    def init_state(self, batch_size: int) -> EchoState:
        return EchoState(
            encoder=self.codec.init_state(batch_size),
            decoder=self.codec.init_state(batch_size),
            previous_codes=torch.zeros(batch_size, self.codes_per_frame, dtype=torch.long, device=self.device),
            has_previous=torch.zeros(batch_size, dtype=torch.bool, device=self.device),
        )

    def reset_rows(self, state: EchoState, rows: list[int]) -> EchoState:
        if not rows:
            return state
        state.encoder.reset_rows(rows)
        state.decoder.reset_rows(rows)
        index = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        state.previous_codes = state.previous_codes.index_fill(0, index, 0)
        state.has_previous = state.has_previous.index_fill(0, index, False)
        return state

    @torch.inference_mode()
    def step(self, user_pcm: Tensor, state: EchoState) -> tuple[Tensor, list[TextPiece], EchoState]:
        """user_pcm: (B, frame_length) -> (pcm (B, frame_length), [None] * B, state)."""
        batch = user_pcm.shape[0]
        self.max_batch_seen = max(self.max_batch_seen, batch)
        pcm, decoder = self.codec.decode_step(state.previous_codes, state.decoder)  # (B, L)
        fresh = ~state.has_previous
        if bool(fresh.any()):
            # Rows with no codes yet decoded placeholder codes: emit silence and rewind their decoder.
            pcm = pcm.masked_fill(fresh.unsqueeze(1), 0.0)
            decoder.reset_rows(fresh)
        codes, encoder = self.codec.encode_step(user_pcm.to(self.device), state.encoder)  # (B, G*R)
        new_state = EchoState(encoder=encoder, decoder=decoder, previous_codes=codes, has_previous=torch.ones_like(fresh))
        return pcm, [None] * batch, new_state


class LoopbackModel:
    """The user's audio back, untouched, one frame later; no text (``speechlm serve --model loopback``: for trying
    clients, microphones and the wire's codec without a model). Its state is each row's last frame."""

    def __init__(self, frame_length: int = 640, sample_rate: int = 16_000):
        self.frame_length = frame_length
        self.sample_rate = sample_rate
        self.max_batch_seen = 0

    def init_state(self, batch_size: int) -> Tensor:
        return torch.zeros(batch_size, self.frame_length)  # (B, frame_length): the frame heard last

    def reset_rows(self, state: Tensor, rows: list[int]) -> Tensor:
        return state.index_fill(0, torch.as_tensor(rows, dtype=torch.long), 0.0) if rows else state

    def step(self, user_pcm: Tensor, state: Tensor) -> tuple[Tensor, list[TextPiece], Tensor]:
        batch = user_pcm.shape[0]
        self.max_batch_seen = max(self.max_batch_seen, batch)
        return state, [None] * batch, user_pcm.detach().clone()


class SilenceModel:
    """Returns silence and no text; its state is one tensor of frame counters."""

    def __init__(self, frame_length: int = 640, sample_rate: int = 16_000):
        self.frame_length = frame_length
        self.sample_rate = sample_rate
        self.max_batch_seen = 0

    def init_state(self, batch_size: int) -> Tensor:
        return torch.zeros(batch_size, dtype=torch.long)  # frames stepped, per row

    def reset_rows(self, state: Tensor, rows: list[int]) -> Tensor:
        return state.index_fill(0, torch.as_tensor(rows, dtype=torch.long), 0) if rows else state

    def step(self, user_pcm: Tensor, state: Tensor) -> tuple[Tensor, list[TextPiece], Tensor]:
        batch = user_pcm.shape[0]
        self.max_batch_seen = max(self.max_batch_seen, batch)
        return torch.zeros(batch, self.frame_length), [None] * batch, state + 1


def with_compiled_codec(model: DuplexModel, cache_dir=None) -> DuplexModel:
    """Swap the model's codec for its AOTInductor-compiled steps (``speechlm.codec.compiled``), in place.

    Models without a codec (``SilenceModel``) are returned unchanged."""
    from ..codec.compiled import CompiledSteps

    codec = getattr(model, "codec", None)
    if codec is not None and not isinstance(codec, CompiledSteps):
        model.codec = CompiledSteps.load_or_build(codec, cache_dir)
    return model
