"""Task adapters: low-rank updates (LoRA, Hu et al. 2021) of a speech LM's linear and embedding
layers, trained for one task while every base weight stays frozen, and switched on only for it.

The shipped model's ASR adapter is the use case: a few thousand CPU steps of ASR-only training
make the model hear better, but the same steps on the whole model pull its speech away from the
GPU run's optimum (docs/benchmarks.md). An adapter hears better where it is switched on (``asr``,
transcribe-first ``chat``) and leaves TTS bit for bit the same elsewhere.

A layer ``W`` (out, in) with an adapter computes ``W x + s B A x`` (``A`` (r, in), ``B`` (out, r),
``s = alpha / r``; ``B`` starts at zero, so a fresh adapter changes nothing). An embedding table
``E`` (N, D) gets ``E[i] + s A[i] B^T`` (``A`` (N, r), ``B`` (D, r)). The base modules are not
replaced: their forward is wrapped to add the update (at inference merged into the weight, once),
so base weight names, files and loaders do not change.
Files: ``adapters/NAME.json`` (:class:`AdapterConfig`) and ``adapters/NAME.safetensors`` beside
the model (``SpeechLM.save_pretrained``)::

    model.add_adapter(AdapterConfig("asr", rank=16))
    with model.adapter("asr"):
        ...  # every forward here adds the asr adapter's update
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from speechlm.codec.errors import SpeechLMError

ADAPTERS_DIR = "adapters"
# The backbone's attention and MLP projections (Llama / Qwen2 names) and the audio input embedding.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "audio_embedding.table")
# Everything speech passes through: the above, the MCTP modules' layers and the audio output head (a parallel
# head's projection; a depth head's input projection and blocks), so that a voice adapter changes the frames
# the MCTP modules predict too.
SPEECH_TARGETS = (*DEFAULT_TARGETS, "fuse", "qkv", "out", "gate_up", "down", "audio_head.proj", "audio_head.in_proj")
TARGET_SETS = {"default": DEFAULT_TARGETS, "speech": SPEECH_TARGETS}
# A voice (``speechlm tts --voice NAME``, ``Generation.voice``) is the model's adapter ``voice-NAME``,
# trained on TTS alone in that voice (docs/lm.md, "Voices").
VOICE_PREFIX = "voice-"


@dataclass
class AdapterConfig:
    name: str
    rank: int = 16
    alpha: float = 32.0  # the update is scaled by alpha / rank
    targets: tuple[str, ...] = DEFAULT_TARGETS  # module paths, or their last components (every layer's q_proj, ...)
    description: str = ""  # what it was trained on (written by ``speechlm train lm --adapter``)

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise SpeechLMError(f"adapter name must be letters, digits, - or _, got {self.name!r}")
        if self.rank < 1:
            raise SpeechLMError(f"adapter rank must be >= 1, got {self.rank}")
        if not self.targets:
            raise SpeechLMError("an adapter needs at least one target layer")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def save(self, directory: Path) -> None:
        (directory / f"{self.name}.json").write_text(json.dumps({**asdict(self), "format_version": 1}, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> AdapterConfig:
        try:
            data = json.loads(path.read_text())
            data.pop("format_version", None)
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as e:
            raise SpeechLMError(f"bad adapter config {path}: {e}") from None


def parse_targets(text: str) -> tuple[str, ...]:
    """``--adapter-targets``: a named set (``default``, ``speech``: :data:`TARGET_SETS`) or comma-separated layer names."""
    if text in TARGET_SETS:
        return TARGET_SETS[text]
    targets = tuple(t.strip() for t in text.split(",") if t.strip())
    if not targets:
        raise SpeechLMError(f"adapter targets: give {' or '.join(TARGET_SETS)} or layer names, got {text!r}")
    return targets


def _key(path: str) -> str:
    return path.replace(".", "__")  # ParameterDict keys may not hold dots


def target_modules(model: nn.Module, targets: tuple[str, ...]) -> dict[str, nn.Module]:
    """The linear and embedding layers of ``model`` that ``targets`` name, by module path."""
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and any(path == t or path.endswith("." + t) for t in targets):
            found[path] = module
    return found


class LoRA(nn.Module):
    """One adapter's low-rank factors for each of its layers (see the module docstring)."""

    def __init__(self, config: AdapterConfig, layers: dict[str, nn.Module]):
        super().__init__()
        self.config = config
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        self._merged: dict[str, tuple] = {}  # path -> (what it was made from, merged weight, A, B)
        self.embeddings = {_key(path) for path, layer in layers.items() if isinstance(layer, nn.Embedding)}
        for path, layer in layers.items():
            weight = layer.weight
            r, kw = config.rank, {"dtype": weight.dtype, "device": weight.device}
            if isinstance(layer, nn.Embedding):  # A (N, r) picked by the ids, B (D, r) from zero
                a, b = torch.empty(layer.num_embeddings, r, **kw), torch.zeros(layer.embedding_dim, r, **kw)
                nn.init.normal_(a, std=1.0 / r)
            else:  # A (r, in) as a linear layer's init, B (out, r) from zero
                a, b = torch.empty(r, layer.in_features, **kw), torch.zeros(layer.out_features, r, **kw)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.A[_key(path)], self.B[_key(path)] = nn.Parameter(a), nn.Parameter(b)

    def covers(self, path: str) -> bool:
        return _key(path) in self.A

    def delta(self, path: str, layer: nn.Module, x: Tensor) -> Tensor:
        """The update to ``layer``'s output for its input ``x`` (ids for an embedding)."""
        a, b = self.A[_key(path)], self.B[_key(path)]
        if isinstance(layer, nn.Embedding):
            return F.embedding(x, a) @ b.t() * self.config.scale
        return F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * self.config.scale

    def merged_weight(self, path: str, layer: nn.Module) -> Tensor:
        """``layer``'s weight with this adapter's update in it, in the layer's dtype: ``W + s B A`` (out, in)
        for a linear layer, ``E + s A B^T`` (N, D) for an embedding (summed in float32, rounded once).
        Made on first use and kept until the layer's weight or the factors change (the weight's storage,
        or anyone's version counter), so switching adapters costs nothing per forward."""
        weight, cached = layer.weight, self._merged.get(path)
        if cached is not None:  # new storage (a dtype or device change converts the factors too) or an in-place update
            made_from, merged, a, b = cached
            if made_from == (weight.data_ptr(), weight._version, a._version, b._version):
                return merged
        a, b = self.A[_key(path)], self.B[_key(path)]
        with torch.no_grad():
            update = a.float() @ b.float().t() if isinstance(layer, nn.Embedding) else b.float() @ a.float()
            merged = (weight.float() + update * self.config.scale).to(weight.dtype)
        self._merged[path] = ((weight.data_ptr(), weight._version, a._version, b._version), merged, a, b)
        return merged


def low_rank_factors(lora: LoRA, rank: int) -> dict[str, Tensor]:
    """Factors of rank ``rank`` for each of ``lora``'s layers: the best approximation (truncated SVD) of the
    layer's update ``s B A`` (``s A B^T`` for an embedding), for an adapter with ``alpha = rank`` (scale 1),
    in ``lora``'s state-dict names and dtype. Fewer bytes for an adapter whose updates need less than its rank."""
    factors = {}
    for key, a in lora.A.items():
        b, embedding = lora.B[key].float(), key in lora.embeddings
        update = (a.float() @ b.t() if embedding else b @ a.float()) * lora.config.scale  # (N, D) or (out, in)
        u, sigma, vh = torch.linalg.svd(update, full_matrices=False)
        left, right = u[:, :rank] * sigma[:rank].sqrt(), vh[:rank].t() * sigma[:rank].sqrt()  # update ~ left right^T
        new_a, new_b = (left, right) if embedding else (right.t(), left)  # A (N, r), B (D, r) / A (r, in), B (out, r)
        factors[f"A.{key}"], factors[f"B.{key}"] = new_a.to(a.dtype).contiguous(), new_b.to(a.dtype).contiguous()
    return factors


def save_adapters(adapters: nn.ModuleDict, directory: Path) -> None:
    """``directory/adapters/NAME.{json,safetensors}`` for each adapter (the folder is replaced)."""
    folder = directory / ADAPTERS_DIR
    if folder.is_dir():
        for old in folder.glob("*"):
            if old.suffix in (".json", ".safetensors"):
                old.unlink()
    if not len(adapters):
        return
    folder.mkdir(parents=True, exist_ok=True)
    for name, lora in adapters.items():
        lora.config.save(folder)
        tensors = {k: t.detach().cpu().contiguous() for k, t in lora.state_dict().items()}
        save_file(tensors, str(folder / f"{name}.safetensors"), metadata={"format": "speechlm-adapter"})


def read_adapters(directory: Path) -> list[tuple[AdapterConfig, dict[str, Tensor]]]:
    """The adapters saved beside a model (none when it has no ``adapters/`` folder)."""
    folder = directory / ADAPTERS_DIR
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        config = AdapterConfig.load(path)
        weights = path.with_suffix(".safetensors")
        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError) as e:
            raise SpeechLMError(f"cannot read adapter weights {weights} (missing, corrupt or not safetensors): {e}") from None
        found.append((config, tensors))
    return found
