"""Copy a trained model from a run directory into the package, so it loads by name offline.

    python -m speechlm.training.ship runs/codec-16k codec-16k

copies ``runs/codec-16k/model/*`` to ``speechlm/models/codec-16k/`` (in the source tree
this module was imported from) and writes ``provenance.json`` beside it: the training step,
the training config and the date, so the shipped weights can be traced to the command
that made them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

MODELS_DIR = Path(__file__).resolve().parent.parent / "speechlm" / "models"


def ship(run_dir: str | Path, name: str, models_dir: Path = MODELS_DIR) -> Path:
    run = Path(run_dir)
    src = run / "model"
    if not src.is_dir():
        raise SystemExit(f"no exported model in {src}")
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False) if (run / "checkpoint.pt").exists() else {}
    dst = models_dir / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    provenance = {"name": name, "run": str(run), "step": ckpt.get("step"), "train_config": ckpt.get("train_config"), "shipped": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (dst / "provenance.json").write_text(json.dumps(provenance, indent=2))
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("name")
    args = ap.parse_args()
    print(f"shipped {ship(args.run_dir, args.name)}")


if __name__ == "__main__":
    main()
