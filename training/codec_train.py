"""``speechlm train codec``: train the GRVQ codec, one process or under ``torchrun``.

Reads top to bottom: config -> data -> models -> (resume) -> loop -> checkpoint.

Losses: multi-resolution log-mel L1 and multi-resolution STFT (spectral convergence +
log-magnitude), the quantizer's commitment loss, and after ``disc_start`` steps a hinge
adversarial loss from a multi-resolution complex-STFT discriminator plus feature matching.
The first ``unquantized_steps`` train the plain autoencoder (no VQ): that warm-up gives the
k-means codebook init good latents to start from.

``decoder_only`` (``--decoder-only``, with ``--init-from``) trains the decoder alone: the
encoder and the codebooks stay frozen (eval mode: no EMA updates, no dead-code
replacement), so every code the start codec gives stays the same and the speech LMs
trained on its tokens stay valid, while the decoder's sound improves (more steps, the
phase and adversarial losses). The exported codec has the same ``codec_id``.

Checkpoints (``OUT/checkpoint.pt``) hold models, optimizers, schedulers, the step and the
torch RNG state, written atomically; a run restarted with the same command resumes where
the last checkpoint left off and takes exactly the steps an uninterrupted run would have
(batches are a function of (seed, step)).  ``OUT/log.jsonl`` gets one line per logged
step (``speechlm plot OUT/log.jsonl`` draws it); ``OUT/model`` is the exported codec
(``Codec.from_pretrained(OUT/model)``).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..codec.config import CodecConfig
from ..codec.discriminator import MultiResolutionSTFTDiscriminator, discriminator_loss, feature_matching_loss, generator_adversarial_loss
from ..codec.errors import SpeechLMError
from ..codec.losses import EnvelopeCorrelationLoss, MultiResolutionMelLoss, MultiResolutionSTFTLoss, PhaseLoss
from ..codec.model import Codec
from .audio_data import AudioPool


@dataclass
class CodecTrainConfig:
    data: list[str]
    out: str
    steps: int = 20_000
    batch_size: int = 16  # global batch (split across DDP ranks)
    crop_seconds: float = 1.0
    lr: float = 1e-3
    disc_lr: float = 2e-4
    warmup_steps: int = 200  # linear LR warm-up, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.05
    unquantized_steps: int = 300
    disc_start: int = 3000
    mel_weight: float = 1.0
    stft_weight: float = 1.0
    phase_weight: float = 0.0  # APNet-style phase losses (PhaseLoss); 0 = off
    envelope_weight: float = 0.0  # band-envelope correlation (EnvelopeCorrelationLoss, a STOI stand-in); 0 = off
    disc_batch: int = 4  # crops of the batch the discriminator sees (it dominates step time on a CPU)
    adv_weight: float = 0.1
    feature_weight: float = 1.0
    grad_clip: float = 1.0
    checkpoint_every: int = 500
    checkpoint_minutes: float = 5.0
    log_every: int = 25
    seed: int = 0
    threads: int = 1
    codec: dict = field(default_factory=dict)  # CodecConfig overrides
    init_from: str | None = None  # start a new run from these codec weights (a directory or shipped name)
    decoder_only: bool = False  # freeze encoder and codebooks (codes unchanged), train the decoder (needs init_from)
    # decoder-only: this share of the batch's rows is decoded from the first k < R residual levels of each group only
    # (k uniform; SoundStream's quantizer dropout), so that the decoder learns the lower bitrates too; 0 = off
    level_dropout: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


def _lr_factor(step: int, config: CodecTrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def codebook_usage(codes: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Fraction of each codebook used in ``codes`` (B, F, Q), and the mean perplexity."""
    flat = codes.reshape(-1, codes.shape[-1])
    used, perplexity = [], []
    for q in range(flat.shape[1]):
        counts = torch.bincount(flat[:, q], minlength=codebook_size).float()
        p = counts / counts.sum()
        used.append(float((counts > 0).float().mean()))
        perplexity.append(float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())))
    return {"codebook_used": sum(used) / len(used), "codebook_used_min": min(used), "codebook_perplexity": sum(perplexity) / len(perplexity)}


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class CodecTrainer:
    """Holds the models, optimizers and data of one run; ``train()`` runs it."""

    def __init__(self, config: CodecTrainConfig, pool: AudioPool | None = None):
        self.config = config
        self.out = Path(config.out)
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("gloo")
        if config.batch_size % self.world_size:
            raise SpeechLMError(f"batch size {config.batch_size} is not divisible by the {self.world_size} processes")
        torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        self.pool = pool if pool is not None else AudioPool(config.data)
        if config.decoder_only and not config.init_from:
            raise SpeechLMError("--decoder-only trains the decoder of an existing codec: give --init-from CODEC")
        if config.level_dropout and not config.decoder_only:
            raise SpeechLMError("--level-dropout trains the decoder for lower bitrates: it needs --decoder-only")
        if not 0.0 <= config.level_dropout <= 1.0:
            raise SpeechLMError(f"--level-dropout must be in [0, 1], got {config.level_dropout}")
        self.codec = Codec(CodecConfig(**config.codec))
        self.disc = MultiResolutionSTFTDiscriminator()
        if config.decoder_only:
            self.codec.encoder.requires_grad_(False)
            self.codec.quantizer.requires_grad_(False)
        self.trained = self.codec.decoder if config.decoder_only else self.codec  # what the generator optimizer updates
        self.opt_g = torch.optim.AdamW(self.trained.parameters(), lr=config.lr, betas=(0.8, 0.99), weight_decay=0.0)
        self.opt_d = torch.optim.AdamW(self.disc.parameters(), lr=config.disc_lr, betas=(0.8, 0.99), weight_decay=0.0)
        self.mel_loss = MultiResolutionMelLoss(sample_rate=self.codec.sample_rate)
        self.stft_loss = MultiResolutionSTFTLoss()
        self.phase_loss = PhaseLoss(self.codec.config.n_fft, self.codec.config.hop_length)
        self.envelope_loss = EnvelopeCorrelationLoss(self.codec.config.sample_rate)
        self.step = 0
        self.crop = int(config.crop_seconds * self.codec.sample_rate) // self.codec.frame_length * self.codec.frame_length
        if self.crop <= 0:
            raise SpeechLMError(f"crop of {config.crop_seconds} s is shorter than one codec frame")
        if not self.resume() and config.init_from:
            start = Codec.from_pretrained(config.init_from)
            if start.codec_id != self.codec.codec_id:
                raise SpeechLMError(f"--init-from {config.init_from} is codec {start.codec_id}, but this run builds {self.codec.codec_id}")
            self.codec.load_state_dict(start.state_dict())
        if config.decoder_only:  # the same codes: the starting codec's code prior (.slc files) stays valid for the new model
            self.codec.code_prior = Codec.from_pretrained(config.init_from).code_prior
        if self.world_size > 1:
            self.codec_ddp = DistributedDataParallel(self.trained)
            self.disc_ddp = DistributedDataParallel(self.disc)
        else:
            self.codec_ddp, self.disc_ddp = self.trained, self.disc

    # -- checkpoints -------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def resume(self) -> bool:
        if not self.checkpoint_path.exists():
            return False
        ckpt = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        saved = {k: v for k, v in ckpt["train_config"].items() if k not in ("steps", "out", "checkpoint_every", "checkpoint_minutes", "log_every", "threads")}
        mine = {k: v for k, v in self.config.to_json().items() if k in saved}
        if saved != mine:
            diff = sorted(k for k in saved if saved[k] != mine[k])
            raise SpeechLMError(f"{self.out} holds a run with other settings ({', '.join(diff)}); use a new --out or the same settings")
        self.codec.load_state_dict(ckpt["codec"])
        self.disc.load_state_dict(ckpt["disc"])
        self.opt_g.load_state_dict(ckpt["opt_g"])
        self.opt_d.load_state_dict(ckpt["opt_d"])
        self.step = ckpt["step"]
        torch.set_rng_state(ckpt["rng"])
        return True

    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        _atomic_save(
            {
                "codec": self.codec.state_dict(),
                "disc": self.disc.state_dict(),
                "opt_g": self.opt_g.state_dict(),
                "opt_d": self.opt_d.state_dict(),
                "step": self.step,
                "rng": torch.get_rng_state(),
                "train_config": self.config.to_json(),
            },
            self.checkpoint_path,
        )
        self.codec.save_pretrained(self.out / "model")

    # -- one step ------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        """One generator and (after ``disc_start``) one discriminator update at ``self.step``."""
        c = self.config
        wav = self.pool.batch(c.seed, self.step, c.batch_size, self.crop, rank=self.rank, world_size=self.world_size)
        for opt in (self.opt_g, self.opt_d):
            for group in opt.param_groups:
                group["lr"] = (c.lr if opt is self.opt_g else c.disc_lr) * _lr_factor(self.step, c)
        quantize = self.step >= c.unquantized_steps
        adversarial = self.step >= c.disc_start
        self.codec.train()
        if c.decoder_only:
            recon, codes, vq_losses = self._decode_frozen_codes(wav)
        else:
            recon, codes, vq_losses = self.codec_ddp(wav, quantize=quantize)
        recon = recon[:, : wav.shape[1]]
        mel = self.mel_loss(recon, wav)
        stft = self.stft_loss(recon, wav)
        commit = vq_losses["commitment"]
        g_loss = c.mel_weight * mel + c.stft_weight * stft + commit
        log = {"mel": mel.item(), "stft": stft.item(), "commitment": commit.item()}
        if c.phase_weight > 0:
            phase = self.phase_loss(recon, wav)
            g_loss = g_loss + c.phase_weight * phase
            log["phase"] = phase.item()
        if c.envelope_weight > 0:
            envelope = self.envelope_loss(recon, wav)
            g_loss = g_loss + c.envelope_weight * envelope
            log["envelope"] = envelope.item()
        n_disc = max(1, c.disc_batch // self.world_size)
        if adversarial:
            self.disc.requires_grad_(False)
            fake, real = self.disc(recon[:n_disc]), self.disc(wav[:n_disc])
            adv, fm = generator_adversarial_loss(fake), feature_matching_loss(real, fake)
            g_loss = g_loss + c.adv_weight * adv + c.feature_weight * fm
            self.disc.requires_grad_(True)
            log.update(adv=adv.item(), feature=fm.item())
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        log["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.trained.parameters(), c.grad_clip))
        self.opt_g.step()
        if adversarial:
            both = self.disc_ddp(torch.cat([wav[:n_disc], recon[:n_disc].detach()]))
            n = n_disc
            d_loss = discriminator_loss([(lg[:n], None) for lg, _ in both], [(lg[n:], None) for lg, _ in both])
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_d.step()
            log["disc"] = d_loss.item()
        log["loss"] = g_loss.item()
        if codes is not None:
            log.update(codebook_usage(codes.detach(), self.codec.config.codebook_size))
            # entries whose EMA usage fell below the threshold: the library re-seeds them from the batch
            log["dead_codes"] = self.codec.quantizer.dead_code_fraction()
        self.step += 1
        return log

    def _decode_frozen_codes(self, wav: torch.Tensor):
        """Decoder-only step: the frozen encoder's codes (B, F, Q) -> the decoder's recon (B, F*frame_length)."""
        self.codec.encoder.eval()
        self.codec.quantizer.eval()
        codes = self.codec.encode(wav).clone()  # inference mode inside; clone: a normal tensor for autograd
        latent = self.codec.quantizer.lookup(codes, self._levels(codes.shape[0]))  # (B, F, D), no gradient
        recon, _ = self.codec_ddp(latent)
        return recon, codes, {"commitment": wav.new_zeros(())}

    def _levels(self, rows: int) -> torch.Tensor | None:
        """``level_dropout``: the residual levels each row of this step's batch is decoded from (R for most; k < R,
        uniform, for that share), a function of (seed, step, rank) so that a resumed run draws the same; None = all."""
        c, R = self.config, self.codec.config.num_quantizers
        if not c.level_dropout or R < 2:
            return None
        g = torch.Generator().manual_seed(c.seed * 1_000_003 + self.step * 101 + self.rank)
        dropped = torch.rand(rows, generator=g) < c.level_dropout
        return torch.where(dropped, torch.randint(1, R, (rows,), generator=g), R)

    # -- the loop --------------------------------------------------------------------------

    def train(self, progress: bool = True) -> None:
        from tqdm import tqdm

        c = self.config
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(json.dumps(c.to_json(), indent=2))
        last_save = time.time()
        start = time.time()
        bar = tqdm(total=c.steps, initial=self.step, disable=not progress or self.rank != 0, desc="codec", unit="step")
        log_file = (self.out / "log.jsonl").open("a") if self.rank == 0 else None
        try:
            while self.step < c.steps:
                log = self.train_step()
                bar.update(1)
                if log_file is not None and (self.step % c.log_every == 0 or self.step == c.steps):
                    log_file.write(json.dumps({"step": self.step, "time": round(time.time() - start, 2), "lr": c.lr * _lr_factor(self.step - 1, c), **{k: round(v, 5) for k, v in log.items()}}) + "\n")
                    log_file.flush()
                    bar.set_postfix(mel=f"{log['mel']:.3f}", used=f"{log.get('codebook_used', 0):.2f}")
                if self.step % c.checkpoint_every == 0 or time.time() - last_save > c.checkpoint_minutes * 60 or self.step == c.steps:
                    self.save_checkpoint()
                    last_save = time.time()
        finally:
            bar.close()
            if log_file is not None:
                log_file.close()
