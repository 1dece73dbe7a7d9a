"""Copy a trained model from a run directory into the package, so it loads by name offline.

    python -m speechlm.training.ship runs/codec-16k codec-16k
    python -m speechlm.training.ship runs/lm-mctp speechlm-default --codec codec-16k --dtype bfloat16
    python -m speechlm.training.ship runs/lm-voice-f2 speechlm-default --codec codec-16k --dtype bfloat16 --adapter-rank voice-f2=6

A codec run: copies ``RUN/model/*`` to ``speechlm/models/NAME/``.  A speech-LM run: saves
the LM there (optionally stored in bfloat16 to halve its size; the pipeline computes in
float32 on CPU) with ``codec.json`` naming the shipped codec it reads and writes. A duplex LM
(``--stage duplex``) ships without its MCTP modules, which its one-frame step never runs.

Either way ``provenance.json`` goes beside it: the training step, the training config and
the date, and for a staged LM every earlier stage (followed through ``--init-from``), so the
shipped weights can be traced to the commands that made them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

MODELS_DIR = Path(__file__).resolve().parent.parent / "speechlm" / "models"


def _run_record(run: Path) -> dict:
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False) if (run / "checkpoint.pt").exists() else {}
    config = ckpt.get("train_config")
    if config is None and (run / "train_config.json").exists():
        config = json.loads((run / "train_config.json").read_text())
    return {"run": str(run), "step": ckpt.get("step"), "train_config": config}


def _shipped_provenance(init: str) -> dict | None:
    """The provenance of a shipped model a run started from (a directory or a shipped name)."""
    for directory in (Path(init), MODELS_DIR / init):
        if (directory / "provenance.json").is_file():
            return json.loads((directory / "provenance.json").read_text())
    return None


def _stages(run: Path, limit: int = 10) -> list[dict]:
    """This run and the runs it was initialised from (``init_from`` = RUN/model), oldest first.

    A chain that starts from a shipped model (``--init-from speechlm-default``) takes that
    model's recorded stages first."""
    chain = []
    while run is not None and len(chain) < limit:
        record = _run_record(run)
        chain.append(record)
        init = (record["train_config"] or {}).get("init_from")
        parent = Path(init).parent if init else None
        run = parent if parent is not None and (parent / "train_config.json").exists() else None
        if run is None and init and (shipped := _shipped_provenance(init)) is not None:
            # A shipped codec records its one run at the top level, a speech LM its stages.
            before = shipped.get("stages") or [{k: shipped[k] for k in ("run", "step", "train_config") if k in shipped}]
            return before + chain[::-1]
    return chain[::-1]


def ship(
    run_dir: str | Path,
    name: str,
    models_dir: Path = MODELS_DIR,
    *,
    codec: str | None = None,
    dtype: str | None = None,
    mctp_modules: int | None = None,
    adapter_ranks: dict[str, int] | None = None,
) -> Path:
    run = Path(run_dir)
    src = run / "model"
    if not src.is_dir():
        raise SystemExit(f"no exported model in {src}")
    dst = models_dir / name
    stages = _stages(run)  # before the old model goes: a run may have started from it
    if dst.exists():
        shutil.rmtree(dst)
    provenance = {"name": name, "shipped": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if (src / "speechlm_config.json").exists():
        from speechlm.codec.model import Codec
        from speechlm.lm.duplex import DuplexLM, is_duplex_dir
        from speechlm.lm.model import SpeechLM
        from speechlm.speech import CODEC_REF, SpeechPipeline

        if codec is None:
            raise SystemExit("a speech LM ships with the name of its codec: pass --codec NAME (a shipped codec)")
        codec_model = Codec.from_pretrained(codec)
        if is_duplex_dir(src):  # one frame per step: its MCTP modules are never used
            model = DuplexLM.from_pretrained(src)
            model.lm.keep_mctp_modules(0 if mctp_modules is None else mctp_modules)
        else:
            model = SpeechLM.from_pretrained(src)
            if mctp_modules is not None:
                model.keep_mctp_modules(mctp_modules)
            for adapter, rank in (adapter_ranks or {}).items():  # before rounding: the SVD of the trained factors
                model.reduce_adapter_rank(adapter, rank)
        if dtype:
            model = model.to(getattr(torch, dtype))
        if is_duplex_dir(src):
            model.save_pretrained(dst)
            (dst / CODEC_REF).write_text(json.dumps({"codec": codec, "codec_id": codec_model.codec_id}))
        else:
            SpeechPipeline(model, codec_model).save_pretrained(dst, codec_name=codec)
        provenance |= {"dtype": dtype or str(next(model.parameters()).dtype).removeprefix("torch."), "codec": codec, "stages": stages}
    else:
        shutil.copytree(src, dst)
        provenance |= _run_record(run)
        if len(stages) > 1:  # e.g. a decoder-only run from a shipped codec: the runs before it too
            provenance["stages"] = stages
    (dst / "provenance.json").write_text(json.dumps(provenance, indent=2))
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("name")
    ap.add_argument("--codec", help="speech LM: the shipped codec it was trained on")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="speech LM: store the weights in this dtype")
    ap.add_argument("--mctp-modules", type=int, help="speech LM: keep only the first N MCTP modules (a duplex LM keeps none)")
    ap.add_argument("--adapter-rank", action="append", default=[], metavar="NAME=RANK",
                    help="speech LM: store adapter NAME at this lower rank (the best approximation of its updates; repeatable)")
    args = ap.parse_args()
    ranks = {}
    for spec in args.adapter_rank:
        name, _, rank = spec.partition("=")
        if not rank.isdigit():
            raise SystemExit(f"--adapter-rank takes NAME=RANK, got {spec!r}")
        ranks[name] = int(rank)
    shipped = ship(args.run_dir, args.name, codec=args.codec, dtype=args.dtype, mctp_modules=args.mctp_modules, adapter_ranks=ranks)
    print(f"shipped {shipped}")


if __name__ == "__main__":
    main()
