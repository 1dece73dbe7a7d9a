"""``speechlm train lm``: train the speech LM, stage by stage, one process or under ``torchrun``.

Reads top to bottom: config -> model (fresh, or the previous stage's export) -> data ->
optimizer -> (resume) -> loop -> checkpoint.

Stages (``--stage``, see ``speechlm.lm.model``): ``text`` trains a text LM (a backbone from a
local HF directory or built from a JSON LlamaConfig/Qwen2Config, tokenizer from a directory
or a byte-level BPE trained on our text corpus); ``align``, ``mctp1``, ``mctp`` and ``sft``
each start from the previous stage's exported model (``--init-from RUN/model``). A model
whose speech modules were never trained (a ``text`` stage export) is re-fitted to the codec
of the data (codebooks, codebook size) with fresh speech modules. ``duplex`` trains a
``speechlm.lm.duplex.DuplexLM`` (usually from the ``sft`` export) on two-channel dialogues
(``speechlm.training.duplex_data``; ``--max-length`` = crop length in frames) and exports it
with its duplex sidecar files.

Batches are a pure function of (seed, step): the global batch of ``batch_size`` examples is
cut into micro-batches of ``micro_batch_size``; each process takes its share and accumulates
gradients, and the loss is the mean of the micro-batch losses. So one process and N DDP
processes with the same micro-batch size take the same step, and a resumed run takes the
steps an uninterrupted one would have.

Files in ``OUT``: ``checkpoint.pt`` (model, optimizer, step, RNG; written atomically),
``train_config.json``, ``log.jsonl`` (rank 0: loss, text_loss, audio_loss, mctp_1..N, lr,
grad_norm, tokens_per_s; ``speechlm plot OUT/log.jsonl``), ``model/`` (``SpeechLM.save_pretrained``
plus ``train_stage.json``) and ``tokenizer/`` when the BPE was trained here.

FSDP (``--fsdp``, under torchrun, for backbones that do not fit one device): FSDP2
``fully_shard`` per decoder layer and around the whole model; checkpoints gather full state
dicts to rank 0. Tested on CPU (gloo): it takes the same step as one process. The NCCL path is
written but was not run here (no GPU).

``--dtype bfloat16``: the forward under bfloat16 autocast (weights, gradients and the optimizer stay
float32), on CUDA or on the CPU — on a CPU with AMX (this project's machines) a duplex step of 4 x 250
frames takes 0.55x the float32 time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from speechlm.lm import SpeechLM, SpeechLMConfig, add_speech_tokens, load_tokenizer

from ..codec.errors import SpeechLMError
from .codec_train import _atomic_save
from .lm_data import LMFormat, TaskMixture, build_text_corpus, corpus_audio_settings, train_tokenizer
from .lm_train_config import DUPLEX_STAGE, STAGE_WEIGHTS, LMTrainConfig, _json_arg, add_train_lm_arguments, config_from_args, parse_weights  # noqa: F401  (re-exported)
from .tokenize import TokenCorpus

STAGE_FILE = "train_stage.json"
# Default task weights per stage: the MCTP stages train audio outputs only, so they skip
# tasks without audio targets (ASR, text).
# SpeechLMConfig fields that shape the speech modules' weights (or the meaning of the codes).
ARCHITECTURE_FIELDS = (
    "num_codebooks", "codebook_size", "frame_rate", "codec_id", "audio_embed_scale", "output_head", "delays", "depth_dim", "depth_layers",
    "depth_heads", "mctp_modules", "mctp_layers", "mctp_intermediate_size",
)  # fmt: skip
# Settings a resumed run may change.
RESUMABLE = ("steps", "stop_at", "time_budget_minutes", "out", "checkpoint_every", "checkpoint_minutes", "log_every", "threads", "loader_workers", "device")


def lr_factor(step: int, config: LMTrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# -- building the model -------------------------------------------------------------------------


def adapter_description(c: LMTrainConfig) -> str:
    """What a new adapter is trained on, for its config (and ``speechlm tts --list-voices``)."""
    weights = ",".join(f"{task}={w:g}" for task, w in c.task_weights.items())
    voices = f" spoken by {', '.join(c.assistant_voices)}" if c.assistant_voices else ""
    return f"stage {c.stage}, tasks {weights}{voices}, data {' '.join(Path(d).name for d in c.data)}"


def read_stage(model_dir: str | Path) -> dict | None:
    path = Path(model_dir) / STAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _backbone_config(spec: str, vocab_size: int):
    """A JSON LlamaConfig/Qwen2Config (file or string, with ``model_type``) -> a transformers config."""
    from transformers import AutoConfig

    data = _json_arg(spec, "backbone config")
    if "model_type" not in data:
        raise SpeechLMError('a backbone config JSON needs "model_type" (e.g. "llama" or "qwen2")')
    data = {k: v for k, v in data.items() if k not in ("architectures", "transformers_version")}
    try:
        return AutoConfig.for_model(data.pop("model_type"), **{**data, "vocab_size": vocab_size})
    except (ValueError, TypeError) as e:
        raise SpeechLMError(f"bad backbone config: {e}") from None


def build_model(config: LMTrainConfig, audio: dict, tokenizer_texts, *, rank: int = 0) -> SpeechLM:
    """The model a run starts from (before its checkpoint, if any, is loaded).

    ``audio``: codec settings of the data (empty without data); ``tokenizer_texts()`` ->
    (TextCorpus, extra texts) to train a BPE on, called only when one is needed.
    """
    speech = {**audio, **config.speech}
    if config.init_from:
        model = SpeechLM.from_pretrained(config.init_from).float()
        wanted = SpeechLMConfig.from_dict({**model.config.to_dict(), **speech})
        # A model that names no codec (codec_id None) takes the data's.
        changed = [
            name
            for name in ARCHITECTURE_FIELDS
            if getattr(wanted, name) != getattr(model.config, name) and not (name == "codec_id" and model.config.codec_id is None)
        ]
        if changed:
            previous = (read_stage(config.init_from) or {}).get("stage")
            if previous != "text":
                raise SpeechLMError(
                    f"{config.init_from} does not match this run's codec/speech settings ({', '.join(changed)}) and its speech "
                    f"modules were trained (stage {previous or 'unknown'}); tokenize the data with its codec or start again from a text-stage model"
                )
            # A text-stage export: its speech modules never trained; build them for this codec.
            return SpeechLM.from_backbone(model.backbone, model.tokenizer, config=wanted)
        model.config = wanted  # loss weights, schedule, hearing head
        if wanted.hearing_layer is not None and model.hearing is None:
            model.add_hearing_head(wanted.hearing_layer)  # a hearing head added to a trained model starts fresh
        return model

    out = Path(config.out)
    backbone_is_dir = Path(config.backbone).is_dir()
    choice = config.tokenizer
    if choice is None:
        has_tokenizer = backbone_is_dir and any((Path(config.backbone) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        choice = config.backbone if has_tokenizer else "train-bpe"
    if choice == "train-bpe":
        saved = out / "tokenizer"
        if not (saved / "tokenizer.json").is_file():
            if rank == 0:
                corpus, transcripts = tokenizer_texts()
                train_tokenizer(corpus, saved, vocab_size=config.bpe_vocab_size, config=SpeechLMConfig(**speech), extra_texts=transcripts)
            if dist.is_initialized():
                dist.barrier()
        tokenizer = load_tokenizer(saved)
    else:
        tokenizer = load_tokenizer(choice)
    if backbone_is_dir:
        backbone = config.backbone
    else:
        add_speech_tokens(tokenizer, SpeechLMConfig(**speech))
        backbone = _backbone_config(config.backbone, vocab_size=math.ceil(len(tokenizer) / 64) * 64)
    return SpeechLM.from_backbone(backbone, tokenizer, **speech).float()


# -- the trainer ----------------------------------------------------------------------------------


class _StepBatches(torch.utils.data.Dataset):
    """The micro-batches of one process for steps ``start..end - 1``, item k = step ``start + k``.

    Built by the mixture from (seed, step, index) alone, so a worker process builds exactly the batch
    the training loop would have built itself.
    """

    def __init__(self, mixture, micro_batches: list[list[int]], start: int, end: int):
        self.mixture, self.micro_batches, self.start, self.end = mixture, micro_batches, start, end

    def __len__(self) -> int:
        return max(0, self.end - self.start)

    def __getitem__(self, k: int) -> list[dict[str, torch.Tensor]]:
        return [self.mixture.batch(self.start + k, indices) for indices in self.micro_batches]


class LMTrainer:
    """Holds the model, optimizer and data of one run; ``train()`` runs it."""

    def __init__(self, config: LMTrainConfig):
        self.config = c = config
        self.out = Path(c.out)
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = ("cuda" if torch.cuda.is_available() else "cpu") if c.device == "auto" else c.device
        self.device = torch.device(f"cuda:{local_rank}" if device == "cuda" else device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if c.fsdp and "MASTER_ADDR" not in os.environ:
            raise SpeechLMError("--fsdp runs under torchrun, e.g. torchrun --nproc_per_node N -m speechlm train lm ... --fsdp")
        if (self.world_size > 1 or c.fsdp) and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        micro = c.micro_batch_size or c.batch_size // self.world_size
        if micro < 1 or c.batch_size % micro or (c.batch_size // micro) % self.world_size:
            raise SpeechLMError(
                f"batch size {c.batch_size} must split into micro-batches of {micro} shared evenly by {self.world_size} process(es)"
            )
        chunks = [list(range(i, i + micro)) for i in range(0, c.batch_size, micro)]
        per_rank = len(chunks) // self.world_size
        self.micro_batches = chunks[self.rank * per_rank : (self.rank + 1) * per_rank]
        torch.set_num_threads(c.threads)
        torch.manual_seed(c.seed)

        # Data first: the codec of the corpora fixes the audio layout of the model.
        corpora = [TokenCorpus(d) for d in c.data]
        audio = corpus_audio_settings(corpora) if corpora else {}
        weights = c.task_weights
        text_corpus = None

        def text_corpus_once():
            nonlocal text_corpus
            if text_corpus is None:
                text_corpus = build_text_corpus(c.text_count, seed=c.seed, files=c.text_files)
            return text_corpus

        def tokenizer_texts():
            transcripts = [row.get("text", "") for corpus in corpora for row in corpus.rows if row.get("split", "train") == "train"]
            return text_corpus_once(), transcripts

        if c.stage == DUPLEX_STAGE:  # a DuplexLM on two-channel dialogues (speechlm.training.duplex_data)
            from .duplex_data import DuplexMixture, build_duplex_model

            self.model = build_duplex_model(c, audio, tokenizer_texts, rank=self.rank)
        else:
            self.model = build_model(c, audio, tokenizer_texts, rank=self.rank)
        self.model.set_stage(c.stage)
        speech_lm = getattr(self.model, "lm", self.model)  # a DuplexLM's speech LM
        # an adapter belongs to the base weights it was trained on: a run that trains them drops the model's
        # adapters; a run that trains one adapter (the base frozen) keeps the others as they are
        stale = [] if c.adapter else list(speech_lm.adapters)
        for name in stale:
            speech_lm.remove_adapter(name)
        if stale and self.rank == 0:
            print(f"dropped task adapter(s) {', '.join(stale)} of {c.init_from}: "
                  "this run changes what they were trained on; train them again with --adapter", file=sys.stderr)
        if c.adapter:  # only the task adapter trains; the base model stays as it was
            from speechlm.lm.adapters import AdapterConfig, parse_targets

            if c.adapter not in speech_lm.adapters:
                speech_lm.add_adapter(AdapterConfig(c.adapter, rank=c.adapter_rank, targets=parse_targets(c.adapter_targets),
                                                    description=adapter_description(c)))
            speech_lm.train_adapter(c.adapter)
        max_positions = getattr(speech_lm.backbone.config, "max_position_embeddings", None)
        if max_positions is not None and c.max_length > max_positions:
            raise SpeechLMError(f"max_length {c.max_length} exceeds the backbone's max_position_embeddings {max_positions}")
        if c.stage == DUPLEX_STAGE:
            self.mixture = DuplexMixture(self.model, corpora, seed=c.seed, frames=c.max_length, p_from_start=c.p_from_start)
        else:
            self.mixture = TaskMixture(
                LMFormat.from_model(self.model),
                corpora,
                weights,
                text=text_corpus_once() if weights.get("text", 0) > 0 else None,
                seed=c.seed,
                max_length=c.max_length,
                text_row_length=c.text_row_length,
                pack_text=c.stage == "text" if c.pack_text is None else c.pack_text,
                p_switch=c.p_switch,
                text_per_chunk=c.text_per_chunk,
                audio_per_chunk=c.audio_per_chunk,
                first_text=c.first_text,
                assistant_voices=c.assistant_voices,
                text_dropout=c.text_dropout,
            )

        self.step = 0
        checkpoint = self._load_checkpoint()
        if checkpoint is not None:
            self.model.load_state_dict(checkpoint["model"])
            self.step = checkpoint["step"]
            if c.time_budget_minutes is not None and self.step >= self._budget_steps()[1]:
                c.steps = checkpoint["train_config"]["steps"]  # the schedule was fitted before the checkpoint
        self.model.to(self.device).train()
        if c.fsdp:
            self.wrapped = self._fully_shard()  # replaces the parameters with sharded ones
        elif self.world_size > 1:
            # Unused parameters: a micro-batch without audio leaves the audio modules out of the graph.
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(self.model, device_ids=device_ids, find_unused_parameters=True)
        else:
            self.wrapped = self.model
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in self.trainable if p.ndim >= 2]
        no_decay = [p for p in self.trainable if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=c.lr, betas=(0.9, 0.95)
        )
        if checkpoint is not None:
            if c.fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(
                    self.model, self.optimizer, checkpoint["optimizer"], options=StateDictOptions(full_state_dict=True)
                )
            else:
                self.optimizer.load_state_dict(checkpoint["optimizer"])
            torch.set_rng_state(checkpoint["rng"])

    def _fully_shard(self):
        from torch.distributed.fsdp import fully_shard

        for layer in getattr(self.model.backbone.base_model, "layers", []):
            fully_shard(layer)
        fully_shard(self.model)
        return self.model

    # -- checkpoints -------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def _load_checkpoint(self) -> dict | None:
        if not self.checkpoint_path.exists():
            return None
        ckpt = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        saved = {k: v for k, v in ckpt["train_config"].items() if k not in RESUMABLE}
        mine = {k: v for k, v in self.config.to_json().items() if k in saved}
        if saved != mine:
            diff = sorted(k for k in saved if saved[k] != mine.get(k))
            raise SpeechLMError(f"{self.out} holds a run with other settings ({', '.join(diff)}); use a new --out or the same settings")
        return ckpt

    def save_checkpoint(self) -> None:
        """Write ``checkpoint.pt`` and export ``model/`` (rank 0; every rank must call it under FSDP)."""
        if self.config.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state = get_model_state_dict(self.model, options=options)
            optimizer_state = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        elif self.rank == 0:
            model_state, optimizer_state = self.model.state_dict(), self.optimizer.state_dict()
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        _atomic_save(
            {
                "model": model_state,
                "optimizer": optimizer_state,
                "step": self.step,
                "rng": torch.get_rng_state(),
                "train_config": self.config.to_json(),
            },
            self.checkpoint_path,
        )
        self.export(model_state)

    def export(self, model_state: dict | None = None) -> Path:
        """``OUT/model``: the model via ``save_pretrained``, plus ``train_stage.json``."""
        model = self.model
        if self.config.fsdp:  # the sharded module cannot save itself: rebuild an unsharded copy
            from transformers import AutoModelForCausalLM

            backbone = AutoModelForCausalLM.from_config(self.model.backbone.config)
            model = SpeechLM(self.model.config, backbone, self.model.tokenizer)
            model.load_state_dict(model_state)
        directory = self.out / "model"
        model.save_pretrained(directory)
        codec_id = getattr(self.model, "lm", self.model).config.codec_id
        info = {"stage": self.config.stage, "step": self.step, "init_from": self.config.init_from, "codec_id": codec_id}
        (directory / STAGE_FILE).write_text(json.dumps(info, indent=2) + "\n")
        return directory

    def _budget_steps(self) -> tuple[int, int]:
        """--time-budget-minutes: the steps timed (from, to), inside warm-up, where the learning rate
        does not depend on ``steps`` yet."""
        to = min(self.config.warmup_steps, 30)
        return to // 3, to

    def _fit_schedule(self, seconds: float, timed_steps: int) -> int:
        """Sets ``steps`` to what fits the time budget at ``seconds`` per ``timed_steps`` (rank 0's clock)."""
        c = self.config
        per_step = torch.tensor([seconds / timed_steps], dtype=torch.float64)
        if self.world_size > 1:
            per_step = per_step.to(self.device)
            dist.broadcast(per_step, 0)
        fitted = int(c.time_budget_minutes * 60 / float(per_step))
        c.steps = max(self.step + 1, min(c.steps, fitted))
        if self.rank == 0:
            print(f"time budget {c.time_budget_minutes} min at {float(per_step) * 1000:.0f} ms a step: {c.steps} steps")
            (self.out / "train_config.json").write_text(json.dumps(c.to_json(), indent=2))
        return c.steps

    # -- one step ----------------------------------------------------------------------------

    def _sync_gradients(self, sync: bool):
        if self.config.fsdp:
            self.model.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        if isinstance(self.wrapped, DistributedDataParallel) and not sync:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def step_batches(self, start: int, end: int):
        """Yields this process's micro-batches of steps ``start..end - 1``, in order; with
        ``loader_workers`` they are built ahead of the step in worker processes (the same batches)."""
        dataset = _StepBatches(self.mixture, self.micro_batches, start, end)
        workers = self.config.loader_workers
        if workers <= 0:
            yield from (dataset[k] for k in range(len(dataset)))
            return
        import multiprocessing

        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=4,
            pin_memory=self.device.type == "cuda",
            multiprocessing_context=multiprocessing.get_context("fork"),  # the mixture is not pickled
            worker_init_fn=lambda _: torch.set_num_threads(1),
        )
        yield from loader

    def train_step(self, *, all_losses: bool = True, batches: list[dict[str, torch.Tensor]] | None = None) -> dict[str, float]:
        """One optimizer step on global batch ``self.step``; returns its metrics (averaged over processes).

        ``all_losses``: also compute (for the log) the losses this stage does not train on.
        ``batches``: this process's micro-batches of the step (from :meth:`step_batches`); built here if None.
        """
        c = self.config
        started = time.time()
        lr = c.lr * lr_factor(self.step, c)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        n_mctp = len(getattr(self.model, "mctp", ()))  # a DuplexLM has none in use
        keys = ["loss", "text_loss", "audio_loss", "hearing_loss", *[f"mctp_{i}" for i in range(1, n_mctp + 1)]]
        sums = torch.zeros(len(keys) + 2, dtype=torch.float64)  # + tokens, audio positions
        counts = torch.zeros(len(keys), dtype=torch.float64)
        autocast = (
            torch.autocast(self.device.type, dtype=getattr(torch, c.dtype)) if c.dtype != "float32" else contextlib.nullcontext()
        )
        self.optimizer.zero_grad(set_to_none=True)
        if batches is None:
            batches = _StepBatches(self.mixture, self.micro_batches, self.step, self.step + 1)[0]
        for k, batch in enumerate(batches):
            batch = {name: t.to(self.device, non_blocking=True) for name, t in batch.items()}
            with self._sync_gradients(k == len(self.micro_batches) - 1):
                with autocast:
                    out = self.wrapped(**batch, all_losses=all_losses)
                if out.loss is None:
                    raise SpeechLMError(f"stage {c.stage!r} has nothing to learn from micro-batch {k} of step {self.step}")
                (out.loss / len(self.micro_batches)).backward()
            hearing = getattr(out, "hearing_loss", None)  # a DuplexLM's output has none
            values = [out.loss, out.text_loss, out.audio_loss, hearing, *(out.mctp_losses + [None] * n_mctp)[:n_mctp]]
            for j, value in enumerate(values):
                if value is not None:
                    sums[j] += float(value.detach())
                    counts[j] += 1
            sums[-2] += float(batch["attention_mask"].sum())
            sums[-1] += float(batch["audio_mask" if "audio_mask" in batch else "attention_mask"].sum())  # duplex: a frame per position
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, c.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.step += 1
        if self.world_size > 1:
            reduced = torch.cat((sums, counts)).to(self.device)  # NCCL reduces device tensors only
            dist.all_reduce(reduced)
            sums, counts = reduced.cpu().split([len(sums), len(counts)])
        log = {key: float(sums[j] / counts[j]) for j, key in enumerate(keys) if counts[j] > 0}
        seconds = time.time() - started
        log.update(lr=lr, grad_norm=float(grad_norm), tokens=int(sums[-2]), audio_positions=int(sums[-1]))
        log["tokens_per_s"] = float(sums[-2]) / max(seconds, 1e-9)
        return log

    # -- the loop ----------------------------------------------------------------------------

    def train(self, progress: bool = True) -> None:
        from tqdm import tqdm

        c = self.config
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(json.dumps(c.to_json(), indent=2))
        last_save = time.time()
        start = time.time()
        end = min(c.steps, c.stop_at) if c.stop_at is not None else c.steps
        time_from, time_to = self._budget_steps()
        if c.time_budget_minutes is not None and time_to < 10:
            raise SpeechLMError("--time-budget-minutes times warm-up steps: it needs --warmup-steps of at least 10")
        fitting = c.time_budget_minutes is not None and self.step < time_to
        timed_since = None
        if fitting and self.step >= time_from:  # resumed inside the timed steps: time from here
            time_from, timed_since = self.step, time.time()
        bar = tqdm(total=end, initial=self.step, disable=not progress or self.rank != 0, desc=f"lm {c.stage}", unit="step")
        log_file = (self.out / "log.jsonl").open("a") if self.rank == 0 else None
        batches = self.step_batches(self.step, end)
        try:
            for step_batches in batches:
                if self.step >= end:  # a fitted schedule ends before the loader's range
                    break
                log_now = (self.step + 1) % c.log_every == 0 or self.step + 1 == end
                log = self.train_step(all_losses=log_now, batches=step_batches)
                if fitting and self.step == time_from:
                    timed_since = time.time()
                elif fitting and self.step == time_to:
                    fitting = False
                    fitted = self._fit_schedule(time.time() - timed_since, time_to - time_from)
                    end = min(fitted, c.stop_at) if c.stop_at is not None else fitted
                    bar.total = end
                bar.update(1)
                if log_file is not None and log_now:
                    row = {"step": self.step, "time": round(time.time() - start, 2), "stage": c.stage}
                    row.update({k: (round(v, 6) if isinstance(v, float) else v) for k, v in log.items()})
                    log_file.write(json.dumps(row) + "\n")
                    log_file.flush()
                    bar.set_postfix(loss=f"{log['loss']:.3f}")
                save = self.step % c.checkpoint_every == 0 or time.time() - last_save > c.checkpoint_minutes * 60 or self.step == end
                if c.fsdp and self.world_size > 1:  # every rank must join the gather: rank 0's clock decides
                    flag = torch.tensor([int(save)], device=self.device if self.device.type == "cuda" else "cpu")
                    dist.broadcast(flag, 0)
                    save = bool(flag.item())
                if save:
                    self.save_checkpoint()
                    last_save = time.time()
        finally:
            batches.close()  # stops the loader's workers
            bar.close()
            if log_file is not None:
                log_file.close()


# -- command line ---------------------------------------------------------------------------------


def train_lm_main(args: argparse.Namespace) -> int:
    """``speechlm train lm``: build the trainer from parsed arguments and run it."""
    trainer = LMTrainer(config_from_args(args))
    if trainer.rank == 0:
        n_params = sum(p.numel() for p in trainer.model.parameters())
        n_trained = sum(p.numel() for p in trainer.trainable)
        print(f"stage {args.stage}: {n_params / 1e6:.2f} M parameters, {n_trained / 1e6:.2f} M trained; starting at step {trainer.step}")
        print(f"data: {trainer.mixture.describe()}")
    trainer.train(progress=not args.quiet)
    if dist.is_initialized():
        dist.barrier()  # every rank done (export, last checkpoint) before any tears the process group down
    if trainer.rank == 0:
        print(f"done: {trainer.step} steps; model in {Path(args.out) / 'model'}")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m speechlm.training.lm_train", description="Train the speech LM (one stage).")
    _parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    add_train_lm_arguments(_parser)
    _args = _parser.parse_args()
    try:
        sys.exit(train_lm_main(_args))
    except (SpeechLMError, FileNotFoundError) as _e:
        if _args.debug:
            raise
        print(f"speechlm: error: {_e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
