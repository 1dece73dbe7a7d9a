"""Settings of ``speechlm train lm``: the LMTrainConfig dataclass, per-stage task weights and the
command-line options. Free of torch so that ``speechlm --help`` stays fast."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..codec.errors import SpeechLMError

# Must equal speechlm.lm.model.STAGES and speechlm.training.lm_data.TASKS (a test checks).
STAGES = ("text", "align", "mctp1", "mctp", "sft")
TASKS = ("tts", "asr", "interleave", "spoken_qa", "text")
# Stage "duplex" (speechlm.lm.duplex, speechlm.training.duplex_data) trains a DuplexLM on
# two-channel dialogues instead of the task mixture; it is not a SpeechLM stage.
DUPLEX_STAGE = "duplex"
TRAIN_STAGES = (*STAGES, DUPLEX_STAGE)

STAGE_WEIGHTS: dict[str, dict[str, float]] = {
    "text": {"text": 1.0},
    "align": {"tts": 1.0, "asr": 1.0, "interleave": 1.0, "spoken_qa": 0.5, "text": 0.2},
    "mctp1": {"tts": 1.0, "interleave": 1.0, "spoken_qa": 0.5},
    "mctp": {"tts": 1.0, "interleave": 1.0, "spoken_qa": 0.5},
    "sft": {"tts": 1.0, "asr": 1.0, "interleave": 0.5, "spoken_qa": 1.0, "text": 0.2},
}


@dataclass
class LMTrainConfig:
    out: str
    stage: str = "align"
    data: list[str] = field(default_factory=list)  # tokenized corpora (speechlm data tokenize)
    init_from: str | None = None  # the previous stage's exported model (RUN/model)
    backbone: str | None = None  # fresh start: a local HF model directory, or a JSON (file or string) of a Llama/Qwen2 config
    tokenizer: str | None = None  # fresh start: a tokenizer directory or "train-bpe"; None = the backbone directory's, else train-bpe
    bpe_vocab_size: int = 8192
    speech: dict = field(default_factory=dict)  # SpeechLMConfig overrides (output_head, mctp_modules, ...)
    duplex: dict = field(default_factory=dict)  # stage duplex: DuplexConfig overrides (text_pad_weight, window, ...)
    p_from_start: float = 0.25  # stage duplex: share of crops that start at the dialogue's first frame
    weights: dict[str, float] | None = None  # task weights; None = STAGE_WEIGHTS[stage]
    # train only a task adapter of this name (speechlm.lm.adapters: LoRA on the backbone and the audio
    # embedding; every base weight frozen), e.g. "asr" with --weights asr=1; continued if init_from has it
    adapter: str | None = None
    adapter_rank: int = 16
    # the layers a new adapter adapts: "default" (backbone projections, audio embedding), "speech" (those, the MCTP
    # modules and the audio head: a voice) or comma-separated layer names (speechlm.lm.adapters.parse_targets)
    adapter_targets: str = "default"
    text_files: list[str] = field(default_factory=list)  # extra text for the text task / BPE
    text_count: int = 2000  # items per built-in text source
    max_length: int = 512
    pack_text: bool | None = None  # None = pack in the text stage only
    text_row_length: int | None = None  # length of a packed text row; None = max_length
    p_switch: float = 0.3
    text_per_chunk: int = 4
    audio_per_chunk: int = 8
    first_text: int | None = 1
    assistant_voices: list[str] | None = None  # voices of TTS targets and spoken answers; None = every voice
    # TTS examples drawn without their text (``<|tts|> <|speech_start|> AUDIO <|speech_end|>``), so the model
    # learns the unconditional twin that classifier-free guidance (Generation.guidance) decodes against
    text_dropout: float = 0.0
    steps: int = 10_000
    stop_at: int | None = None  # stop (checkpoint + export) at this step, keeping the schedule of ``steps``
    time_budget_minutes: float | None = None  # fit ``steps`` (an upper bound then) to this much training time, timed in warm-up
    batch_size: int = 16  # global batch, in examples
    micro_batch_size: int | None = None  # None = batch_size / processes (no accumulation)
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200  # linear warm-up, then cosine decay to lr * min_lr_ratio
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    checkpoint_every: int = 500
    checkpoint_minutes: float = 10.0
    log_every: int = 10
    seed: int = 0
    threads: int = 1
    loader_workers: int = 0  # processes that build batches ahead of the step (0: built in the training loop)
    device: str = "auto"  # auto: cuda if available
    dtype: str = "float32"  # autocast dtype of the forward (bfloat16), on CUDA or CPU; weights stay float32
    fsdp: bool = False

    def __post_init__(self) -> None:
        if self.stage not in TRAIN_STAGES:
            raise SpeechLMError(f"unknown stage {self.stage!r}; choose from {', '.join(TRAIN_STAGES)}")
        if self.init_from is None and self.backbone is None:
            raise SpeechLMError("give --init-from (the previous stage's RUN/model) or --backbone (to start from a text LM)")
        if self.stage != "text" and not self.data:
            raise SpeechLMError(f"stage {self.stage!r} needs tokenized speech data (--data DIR ...)")
        unknown = sorted(set(self.weights or {}) - set(TASKS))
        if unknown:
            raise SpeechLMError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
        if self.stage == DUPLEX_STAGE and (self.weights or self.fsdp):
            raise SpeechLMError("stage duplex trains on dialogues only: no --weights; and it does not support --fsdp yet")
        if self.dtype not in ("float32", "bfloat16"):
            raise SpeechLMError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.adapter is not None and (self.stage == DUPLEX_STAGE or self.fsdp or not self.init_from):
            raise SpeechLMError("--adapter trains a task adapter on a trained speech LM: give --init-from, a SpeechLM stage, no --fsdp")

    @property
    def task_weights(self) -> dict[str, float]:
        if self.stage == DUPLEX_STAGE:
            return {"duplex": 1.0}
        return dict(self.weights) if self.weights is not None else dict(STAGE_WEIGHTS[self.stage])

    def to_json(self) -> dict:
        return asdict(self)


def add_train_lm_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``speechlm train lm``."""
    d = LMTrainConfig.__dataclass_fields__
    p = parser.add_argument
    p("--stage", required=True, choices=TRAIN_STAGES, help="training stage: text, align, mctp1, mctp, sft; duplex (two-channel dialogues)")
    p("--out", required=True, help="run directory (checkpoint.pt, log.jsonl, model/); re-run to resume")
    p("--data", nargs="*", default=[], help="tokenized corpora (speechlm data tokenize)")
    p("--init-from", help="the previous stage's exported model (RUN/model)")
    p("--backbone", help="fresh start: local HF model directory, or JSON (file or string) of a Llama/Qwen2 config with model_type")
    p("--tokenizer", help="fresh start: tokenizer directory or 'train-bpe' (default: the backbone's, else train-bpe)")
    p("--bpe-vocab-size", type=int, default=d["bpe_vocab_size"].default)
    p("--speech-config", help='JSON (or a JSON file) of SpeechLMConfig overrides, e.g. \'{"output_head": "depth", "mctp_modules": 4}\'')
    p("--duplex-config", help="stage duplex: JSON (or a JSON file) of DuplexConfig overrides, e.g. '{\"text_pad_weight\": 0.5}'")
    p("--p-from-start", type=float, default=d["p_from_start"].default, help="stage duplex: share of crops starting at frame 0")
    p("--weights", help=f"task weights TASK=W,... over {', '.join(TASKS)} (default per stage: {STAGE_WEIGHTS})")
    p("--adapter", help="train only a task adapter of this name (LoRA; base weights frozen), e.g. asr with --weights asr=1")
    p("--adapter-rank", type=int, default=d["adapter_rank"].default, help="the adapter's rank (default %(default)s)")
    p("--adapter-targets", default=d["adapter_targets"].default,
      help="layers a new adapter adapts: default (backbone, audio embedding), speech (also MCTP and the audio head: "
           "a voice, e.g. --adapter voice-NAME --weights tts=1) or comma-separated layer names (default %(default)s)")
    p("--text-files", nargs="*", default=[], help="extra text (.txt lines or .jsonl with text/answer) for the text task and the BPE")
    p("--text-count", type=int, default=d["text_count"].default, help="items per built-in text source")
    p("--max-length", type=int, default=d["max_length"].default)
    p(
        "--text-row-length",
        type=int,
        default=None,
        help="length of a packed text row (default --max-length); near the speech rows' length, batches pad less",
    )
    p("--pack-text", action=argparse.BooleanOptionalAction, default=None, help="pack text documents into full rows (default: text stage)")
    p("--p-switch", type=float, default=d["p_switch"].default, help="word-level interleaving: switch probability per word boundary")
    p("--text-per-chunk", type=int, default=d["text_per_chunk"].default, help="spoken answers: text tokens per chunk")
    p("--audio-per-chunk", type=int, default=d["audio_per_chunk"].default, help="spoken answers: audio frames per chunk")
    p("--first-text", type=int, default=d["first_text"].default, help="spoken answers: text tokens in the first chunk")
    p("--text-dropout", type=float, default=d["text_dropout"].default,
      help="share of TTS examples trained without their text: the unconditional speech that guidance (--guidance) pushes away from")
    p("--assistant-voices", help="comma-separated voices for TTS targets and spoken answers (default: every voice)")
    p("--steps", type=int, default=d["steps"].default, help="length of the run (the learning-rate schedule)")
    p("--stop-at", type=int, help="stop (checkpoint and export) at this step without changing the schedule; re-run later to go on")
    p("--batch-size", type=int, default=d["batch_size"].default, help="global batch in examples (split across torchrun processes)")
    p(
        "--micro-batch-size",
        type=int,
        help="examples per forward (default: batch size / processes); same value = same step on any process count",
    )
    p("--lr", type=float, default=d["lr"].default)
    p("--min-lr-ratio", type=float, default=d["min_lr_ratio"].default)
    p("--warmup-steps", type=int, default=d["warmup_steps"].default)
    p("--weight-decay", type=float, default=d["weight_decay"].default)
    p("--grad-clip", type=float, default=d["grad_clip"].default)
    p("--checkpoint-every", type=int, default=d["checkpoint_every"].default)
    p("--checkpoint-minutes", type=float, default=d["checkpoint_minutes"].default)
    p("--log-every", type=int, default=d["log_every"].default)
    p("--seed", type=int, default=d["seed"].default)
    p("--threads", type=int, default=d["threads"].default, help="torch threads per process")
    p("--time-budget-minutes", type=float, default=None,
      help="train for about this long: steps of warm-up are timed and the schedule (--steps, then an upper bound) is fitted to it")
    p("--loader-workers", type=int, default=d["loader_workers"].default,
      help="processes that build the next batches while a step runs (a GPU run is data-bound without them); same batches as 0")
    p("--device", default=d["device"].default, help="auto, cpu or cuda")
    p("--dtype", default=d["dtype"].default, choices=["float32", "bfloat16"], help="autocast dtype of the forward, CUDA or CPU (bfloat16: ~1.8x faster steps on CPUs with AMX)")
    p("--fsdp", action="store_true", help="shard the model with FSDP2 (torchrun; for big backbones)")
    p("--quiet", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> LMTrainConfig:
    names = {f.name for f in fields(LMTrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(
        speech=_json_arg(args.speech_config, "--speech-config"),
        duplex=_json_arg(getattr(args, "duplex_config", None), "--duplex-config"),
        weights=parse_weights(args.weights),
        assistant_voices=[v.strip() for v in args.assistant_voices.split(",") if v.strip()] if args.assistant_voices else None,
    )
    return LMTrainConfig(**values)


def _json_arg(text: str | None, what: str) -> dict:
    if not text:
        return {}
    try:
        data = json.loads(text) if text.lstrip().startswith("{") else json.loads(Path(text).read_text())
    except FileNotFoundError:
        raise SpeechLMError(f"{what} file not found: {text}") from None
    except json.JSONDecodeError as e:
        raise SpeechLMError(f"{what} is neither a JSON file nor JSON: {e}") from None
    if not isinstance(data, dict):
        raise SpeechLMError(f"{what} must be a JSON object")
    return data


def parse_weights(text: str | None) -> dict[str, float] | None:
    """``"tts=1,asr=0.5"`` -> ``{"tts": 1.0, "asr": 0.5}``."""
    if not text:
        return None
    weights = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise SpeechLMError(f"bad task weight {part!r}: use TASK=WEIGHT, e.g. tts=1,asr=0.5") from None
    return weights
