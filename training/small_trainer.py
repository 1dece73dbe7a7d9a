"""Resumable one-process training of the small helper models (the pronunciation checker, the speech detector).

A subclass sets ``config`` (with ``steps``, ``lr``, ``warmup_steps``, ``eval_every``, ``checkpoint_minutes`` and
``to_json()``), ``out`` (the run directory), ``model`` and ``optimizer``, calls :meth:`resume`, and implements
:meth:`train_step` (one step on the batch of ``self.step``, drawn from a generator seeded by the step so that a
resumed run takes the same batches; it advances ``self.step`` and returns the loss) and :meth:`evaluate` (held-out
figures by name). :meth:`train` runs to ``config.steps``: each step's loss to OUT/log.jsonl (with the held-out
figures every ``eval_every`` steps), OUT/checkpoint.pt written atomically every ``checkpoint_minutes`` and at
the end, the model saved to OUT/model (its ``save_pretrained``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from .codec_train import _atomic_save


class SmallTrainer:
    config: object
    out: Path
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def resume(self) -> bool:
        """Load OUT/checkpoint.pt if there is one (model, optimizer, step)."""
        if not self.checkpoint_path.is_file():
            return False
        state = torch.load(self.checkpoint_path, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        return True

    def save_checkpoint(self) -> None:
        _atomic_save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                      "train_config": self.config.to_json()}, self.checkpoint_path)

    def lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 5 % of the peak at ``config.steps``."""
        c = self.config
        if step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        progress = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def optimize(self, loss: torch.Tensor) -> float:
        """One optimizer step on ``loss`` at the learning rate of ``self.step`` (gradients clipped to norm 1); the step advances."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * self.lr_factor(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.step += 1
        return float(loss.detach())

    def train_step(self) -> float:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

    def train(self, progress: bool = True) -> None:
        c = self.config
        losses: list[float] = []
        last_save = time.monotonic()
        with (self.out / "log.jsonl").open("a") as log:
            while self.step < c.steps:
                t0 = time.monotonic()
                losses.append(self.train_step())
                record = {"step": self.step, "loss": losses[-1], "lr": c.lr * self.lr_factor(self.step - 1), "seconds": time.monotonic() - t0}
                if self.step % c.eval_every == 0 or self.step == c.steps:
                    held = self.evaluate()
                    record.update(held)
                    if progress:
                        print(f"step {self.step}: loss {np.mean(losses[-c.eval_every:]):.4f} " + " ".join(f"{k} {v:.4f}" for k, v in held.items()), flush=True)
                log.write(json.dumps(record) + "\n")
                log.flush()
                if time.monotonic() - last_save > c.checkpoint_minutes * 60:
                    self.save_checkpoint()
                    last_save = time.monotonic()
        self.save_checkpoint()
        self.model.eval().save_pretrained(self.out / "model")
