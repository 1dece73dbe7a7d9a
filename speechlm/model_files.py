"""The files of the small helper models (the pronunciation checker, the speech detector): a JSON config beside
safetensors weights in one directory, found by path or shipped name."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .codec.errors import SpeechLMError


def save_model_files(model: nn.Module, config: dict, directory: str | os.PathLike, config_file: str, weights_file: str,
                     dtype: torch.dtype | None = None) -> Path:
    """``config`` to DIRECTORY/config_file, ``model``'s state (in ``dtype``, None = as it is) to DIRECTORY/weights_file."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / config_file).write_text(json.dumps(config, indent=2, ensure_ascii=False))
    save_file({k: v.detach().to(dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}, str(directory / weights_file))
    return directory


def load_model_files(path_or_name: str | os.PathLike, config_file: str, weights_file: str, what: str,
                     build: Callable[[dict], nn.Module]) -> nn.Module:
    """The ``what`` (e.g. "speech detector") at ``path_or_name``: ``build(its config)`` with its weights (float32), in
    eval mode; SpeechLMError if the directory holds none."""
    from safetensors.torch import load_file

    from .speech import resolve_model

    directory = resolve_model(path_or_name)
    if not (directory / config_file).is_file():
        raise SpeechLMError(f"{directory} holds no {what} ({config_file} missing)")
    model = build(json.loads((directory / config_file).read_text()))
    model.load_state_dict({k: v.float() for k, v in load_file(str(directory / weights_file)).items()})
    return model.eval()
