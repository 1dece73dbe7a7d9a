"""The speech gate and noise gate: which of a user's frames are speech, for every session at once.

A microphone is never digitally silent: a room hums under the user's pauses. The duplex model was
trained on dialogues whose pauses are exact zeros, and with a faint room (-60 dBFS) under the user it
took its turn once in 20 questions, with -46 dBFS never (docs/benchmarks.md). So the user's audio
reaches it through a noise gate: once the user has been quiet for ``talk_frames`` frames, their
frames are replaced by zeros until they speak again (speech passes from its first frame, so barge-in
is not delayed).

Which frame is speech follows the user and the room, per session (row)::

    level      a decaying maximum of the frames' RMS (halving every level_half_life_s): the user's speech level
    floor      a minimum of the frames' RMS that may rise by at most 2x every noise_rise_s: the room
    threshold  min(voiced_rms, max(min_voiced_rms, noise_margin * floor, voiced_share * level))
    voiced     RMS > threshold

With a speech detector (:class:`speechlm.vad.SpeechDetector`, run frame by frame on every row; the
server's default ``vad-en``), a sound over the threshold is speech only while the detector hears speech
in the frame, or for its first ``onset_frames`` frames (speech passes from its first frame while the
detector, ~20 ms behind, makes up its mind)::

    voiced     RMS > threshold and (detector hears speech or (the run of frames over the threshold <= onset_frames
               and no sound was ruled out in the last doubt_frames frames))

A sound (a run of frames over the threshold) is ruled out when it ends and the detector heard no speech in its last
``onset_frames`` frames (all of it, if shorter) nor in the frame after it (the detector is ~20 ms behind): a click, or
clicks run into the tail of the user's speech. Typing is such sounds, each a frame or two long and every one
a new onset: without the doubt they passed as speech one after another, and the user went on "talking" after the
question (reply onset p90 2.4 s at -34 dBFS; docs/benchmarks.md). Speech that follows a ruled-out sound within
``doubt_frames`` passes once the detector hears it. A frame over the threshold that is not speech reaches the model as
digital silence even while the user is talking (``mute_ruled_out``): the room in the pauses and after the last word
of a loud room, as in its training dialogues' pauses (it took its turn 80-120 ms sooner at -34 dBFS).

A room louder than ``voiced_rms`` (a fan, a street: -34 dBFS) is over the threshold in every frame: without
a detector the user never stops talking, and the duplex model never took its turn (docs/benchmarks.md).

Frames of digital silence (exact zeros: the server's fill for audio that had not arrived) change
neither level nor floor. A new row starts with the threshold at ``voiced_rms`` and the floor at
``voiced_rms / noise_margin``: a quieter room lowers the threshold from its first frame, a noisier
one keeps it. The state is a few (B,) tensors (:class:`GateState`), so the scheduler's row surgery
(rows joining and leaving) carries it like any other per-row state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..codec.errors import SpeechLMError
from ..vad import DetectorState, SpeechDetector

NEVER = 1 << 30  # quiet_run of a row that has heard no speech yet (quiet "forever")
PER_ROW = ("level", "floor", "threshold", "voiced_run", "quiet_run", "loud_run", "unheard_run", "since_ruled_out")


@dataclass
class GateConfig:
    voiced_rms: float = 0.01  # about -40 dBFS: the threshold of a new row, and its highest value
    voiced_share: float = 0.25  # of the user's speech level
    noise_margin: float = 3.0  # times the room's noise floor
    min_voiced_rms: float = 0.003  # about -50 dBFS: the lowest threshold
    level_half_life_s: float = 30.0
    noise_rise_s: float = 2.0
    talk_frames: int = 3  # the user is talking if one of their last this many frames is speech
    # with a speech detector: a sound over the threshold is speech for this many frames before the detector is asked
    onset_frames: int = 5
    # with a speech detector: no onset frames for this many frames after a sound it ruled out (0 = always onset frames)
    doubt_frames: int = 25
    # with a speech detector: a frame over the threshold that is not speech reaches the model as digital silence even
    # while the user talks (the room in the pauses of a loud room, as its training dialogues' pauses were)
    mute_ruled_out: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.min_voiced_rms <= self.voiced_rms or self.noise_margin <= 0 or self.voiced_share < 0:
            raise SpeechLMError(
                f"bad speech gate: need 0 < min_voiced_rms ({self.min_voiced_rms}) <= voiced_rms ({self.voiced_rms}), "
                f"noise_margin > 0 ({self.noise_margin}), voiced_share >= 0 ({self.voiced_share})"
            )
        if self.level_half_life_s <= 0 or self.noise_rise_s <= 0 or self.talk_frames < 1 or self.onset_frames < 0 or self.doubt_frames < 0:
            raise SpeechLMError("bad speech gate: level_half_life_s and noise_rise_s must be > 0, talk_frames >= 1, onset_frames >= 0, doubt_frames >= 0")


@dataclass
class GateState:
    """Per row (B,): the user's speech level, the room's noise floor, the current threshold (all RMS;
    -1 = not yet heard: the config's starting values apply), the runs of voiced and quiet frames and of
    frames over the threshold and of the current sound's last frames without speech (by the detector), the frames
    since it last ruled a sound out, and the speech detector's state (None without one)."""

    level: Tensor  # (B,) float32
    floor: Tensor  # (B,) float32
    threshold: Tensor  # (B,) float32
    voiced_run: Tensor  # (B,) int64
    quiet_run: Tensor  # (B,) int64
    loud_run: Tensor  # (B,) int64
    unheard_run: Tensor  # (B,) int64
    since_ruled_out: Tensor  # (B,) int64
    detector: DetectorState | None = None

    @classmethod
    def fresh(cls, batch_size: int, device: str | torch.device = "cpu", detector: SpeechDetector | None = None) -> GateState:
        unset = torch.full((batch_size,), -1.0, device=device)
        return cls(
            level=torch.zeros(batch_size, device=device),
            floor=unset,
            threshold=unset.clone(),
            voiced_run=torch.zeros(batch_size, dtype=torch.long, device=device),
            quiet_run=torch.full((batch_size,), NEVER, dtype=torch.long, device=device),
            loud_run=torch.zeros(batch_size, dtype=torch.long, device=device),
            unheard_run=torch.zeros(batch_size, dtype=torch.long, device=device),
            since_ruled_out=torch.full((batch_size,), NEVER, dtype=torch.long, device=device),
            detector=None if detector is None else detector.init_stream(batch_size, device),
        )

    @property
    def batch_size(self) -> int:
        return int(self.level.shape[0])

    def reset_rows(self, rows: list[int] | Tensor) -> None:
        """Rows back to a new session's state (new tensors: those of a tick are inference tensors,
        which may not be changed in place outside inference mode)."""
        device = self.level.device
        chosen = torch.zeros(self.batch_size, dtype=torch.bool, device=device)
        chosen[torch.as_tensor(rows, dtype=torch.long, device=device)] = True
        fresh = GateState.fresh(self.batch_size, device)
        for name in PER_ROW:
            setattr(self, name, torch.where(chosen, getattr(fresh, name), getattr(self, name)))
        if self.detector is not None:
            self.detector.reset_rows(rows)

    def thresholds(self, config: GateConfig) -> Tensor:
        """(B,) the threshold each row applies now."""
        return torch.where(self.threshold < 0, torch.full_like(self.threshold, config.voiced_rms), self.threshold)


def frame_rms(pcm: Tensor) -> Tensor:
    """pcm (B, T) -> RMS (B,) in float32."""
    return pcm.float().square().mean(dim=1).sqrt()


def hear(rms: Tensor, state: GateState, config: GateConfig, frame_seconds: float, speech: Tensor | None = None) -> Tensor:
    """One frame per row: RMS (B,) -> voiced (B,) bool; updates ``state`` in place. ``speech`` (B,) bool: whether
    the speech detector hears speech in the frame (None: no detector, the level alone decides)."""
    rms = rms.to(state.level.device, torch.float32)
    decay = 0.5 ** (frame_seconds / config.level_half_life_s)
    rise = 2.0 ** (frame_seconds / config.noise_rise_s)
    floor = torch.where(state.floor < 0, torch.full_like(state.floor, config.voiced_rms / config.noise_margin), state.floor)
    sound = rms > 0  # digital silence says nothing about the room
    level = torch.where(sound, torch.maximum(rms, state.level * decay), state.level)
    floor = torch.where(sound, torch.minimum(rms, floor * rise), floor)
    threshold = torch.maximum(config.noise_margin * floor, config.voiced_share * level).clamp(min=config.min_voiced_rms, max=config.voiced_rms)
    threshold = torch.where(sound, threshold, state.thresholds(config))
    loud = rms > threshold
    last = state.loud_run.clamp(max=config.onset_frames)  # the frames that rule the current sound out, if it ends here
    state.loud_run = torch.where(loud, state.loud_run + 1, 0)
    if speech is None:
        voiced = loud
    else:
        speech = speech.to(loud.device)
        # (this frame's speech counts for a sound that ends here: the detector lags)
        ruled_out = (last > 0) & ~loud & ~speech & (state.unheard_run >= last)
        state.since_ruled_out = torch.where(ruled_out, 0, (state.since_ruled_out + 1).clamp(max=NEVER))
        state.unheard_run = torch.where(loud & ~speech, state.unheard_run + 1, 0)
        onset = (state.loud_run <= config.onset_frames) & (state.since_ruled_out >= config.doubt_frames)
        voiced = loud & (speech | onset)
    state.level, state.floor, state.threshold = level, floor, threshold
    state.voiced_run = torch.where(voiced, state.voiced_run + 1, 0)
    state.quiet_run = torch.where(voiced, 0, (state.quiet_run + 1).clamp(max=NEVER))
    return voiced


def talking(state: GateState, config: GateConfig) -> Tensor:
    """(B,) bool: one of the row's last ``talk_frames`` frames was speech."""
    return state.quiet_run < config.talk_frames


def noise_gate(
    pcm: Tensor, state: GateState, config: GateConfig, frame_seconds: float, detector: SpeechDetector | None = None
) -> tuple[Tensor, Tensor]:
    """pcm (B, T) -> (what the model hears (B, T): zeros in rows whose user is not talking, voiced (B,)).
    Updates ``state`` in place. ``detector``: asked frame by frame (``state`` must hold its state: see
    :meth:`GateState.fresh`); a frame holds speech if one of the detector's frames that ended in it does."""
    speech = None
    if detector is not None:
        if state.detector is None:
            raise SpeechLMError("this gate state has no speech detector state (GateState.fresh(..., detector=...))")
        logits, state.detector = detector.stream(pcm, state.detector)
        speech = (logits > detector.logit_threshold).any(dim=1)
    voiced = hear(frame_rms(pcm), state, config, frame_seconds, speech)
    closed = ~talking(state, config)
    if speech is not None and config.mute_ruled_out:
        closed = closed | ((state.loud_run > 0) & ~voiced)
    closed = closed.to(pcm.device)
    return pcm.masked_fill(closed[:, None], 0.0), voiced

