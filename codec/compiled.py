"""Ahead-of-time compiled streaming steps: the codec's ``encode_step``/``decode_step`` as AOTInductor
packages, 2-3x faster frame by frame on CPU than eager PyTorch.

At batch 1 a frame is about a hundred tiny operators; in eager mode their dispatch costs more
than their arithmetic. ``torch.export`` captures each step once (batch size dynamic, states as
inputs and outputs), AOTInductor compiles it to a shared library with fused kernels, and the
package is cached on disk, keyed by the codec's weights, the torch version and the machine, so
the compile (about a minute on one core) happens once::

    steps = CompiledSteps.load_or_build(Codec.from_pretrained("codec-16k"))
    state = steps.init_state(batch_size)
    codes, state = steps.encode_step(pcm, state)     # (B, frame_length) -> (B, G*R)
    pcm, state = steps.decode_step(codes, state)     # (B, G*R) -> (B, frame_length)

The steps take and return the same :class:`~speechlm.codec.model.CodecState` as the eager ones
(``reset_rows`` and all). Kernels are fused and reductions reordered, so outputs match the eager
steps to float tolerance, not bit for bit: a code can differ where two codebook entries are
equally near (tests measure how often). Needs a C++ compiler (``g++``) the first time.
"""

from __future__ import annotations

import hashlib
import os
import platform
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import SpeechLMError
from .model import Codec, CodecState

PROGRAM_VERSION = 1  # bump when what the programs compute changes: old packages are then not reused
DEFAULT_CACHE = Path(os.environ.get("SPEECHLM_CACHE", Path.home() / ".cache" / "speechlm")) / "aoti"


class _EncodeStep(nn.Module):
    """(pcm, analysis, *stft block states, *frame block states) -> (codes, new states...)."""

    def __init__(self, codec: Codec):
        super().__init__()
        self.codec = codec
        self.stft_blocks = len(codec.encoder.stft_blocks.blocks)

    def forward(self, pcm: Tensor, analysis: Tensor, *blocks: Tensor) -> tuple[Tensor, ...]:
        n = self.stft_blocks
        state = CodecState(analysis, list(blocks[:n]), list(blocks[n:]), [], [], analysis)
        latent, (analysis, stft_state, frame_state) = self.codec.encoder(pcm, state)
        return (self.codec.quantizer.quantize_codes(latent)[:, 0], analysis, *stft_state, *frame_state)


class _DecodeStep(nn.Module):
    """(codes, synthesis, *frame block states, *stft block states) -> (pcm, new states...)."""

    def __init__(self, codec: Codec):
        super().__init__()
        self.codec = codec
        self.frame_blocks = len(codec.decoder.frame_blocks.blocks)

    def forward(self, codes: Tensor, synthesis: Tensor, *blocks: Tensor) -> tuple[Tensor, ...]:
        n = self.frame_blocks
        state = CodecState(synthesis, [], [], list(blocks[:n]), list(blocks[n:]), synthesis)
        latent = self.codec.quantizer.lookup(codes.unsqueeze(1))
        audio, (frame_state, stft_state, synthesis) = self.codec.decoder(latent, state)
        return (audio, synthesis, *frame_state, *stft_state)


def cache_key(codec: Codec) -> str:
    """Weights (every tensor), torch version, CPU/device and Python: what a compiled package depends on."""
    h = hashlib.sha1()
    for name, tensor in sorted(codec.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    device = next(codec.parameters()).device
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else torch.backends.cpu.get_cpu_capability()
    h.update(f"v{PROGRAM_VERSION}|{torch.__version__}|{device.type}|{machine}|{platform.machine()}|{platform.python_version()}".encode())
    return f"{codec.codec_id}-{h.hexdigest()[:12]}"


class CompiledSteps:
    """A codec's streaming steps, compiled; everything else (``frame_length``, ``encode``, ...) is the codec's."""

    def __init__(self, codec: Codec, encode_package, decode_package):
        self.codec = codec
        self._encode = _flat_runner(encode_package)
        self._decode = _flat_runner(decode_package)

    def __getattr__(self, name: str):
        return getattr(self.codec, name)

    @classmethod
    def load_or_build(cls, codec: Codec, cache_dir: str | os.PathLike | None = None, *, max_batch: int = 1024) -> CompiledSteps:
        """Load the packages of this codec from ``cache_dir`` (default ``~/.cache/speechlm/aoti``, or
        ``$SPEECHLM_CACHE/aoti``), compiling and saving them first when they are not there."""
        codec = codec.eval()
        directory = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
        key = cache_key(codec)
        paths = {part: directory / f"{key}-{part}.pt2" for part in ("encode", "decode")}
        try:
            from torch._inductor import aoti_compile_and_package, aoti_load_package
        except ImportError as e:  # pragma: no cover - torch without inductor
            raise SpeechLMError(f"this torch ({torch.__version__}) cannot compile the codec steps: {e}") from None
        if not all(p.is_file() for p in paths.values()):
            directory.mkdir(parents=True, exist_ok=True)
            for part, (module, inputs) in _step_programs(codec).items():
                batch = torch.export.Dim("batch", min=1, max=max_batch)
                tmp = paths[part].with_suffix(f".tmp{os.getpid()}.pt2")
                try:
                    with torch.inference_mode(), warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # inductor's notes on complex and FFT ops, which stay in ATen
                        dynamic = ({0: batch}, {0: batch}, tuple({0: batch} for _ in inputs[2:]))  # (x, tail state, *block states)
                        program = torch.export.export(module, inputs, dynamic_shapes=dynamic)
                        aoti_compile_and_package(program, package_path=str(tmp))
                except Exception as e:  # the compiler is missing, or this torch cannot export the step
                    tmp.unlink(missing_ok=True)  # no half-written package left in the cache
                    raise SpeechLMError(f"cannot compile the codec's {part} step (it needs a C++ compiler such as g++): {str(e).splitlines()[0][:300]}") from None
                os.replace(tmp, paths[part])  # atomic: a concurrent loader never sees half a package
        try:
            packages = {part: aoti_load_package(str(path)) for part, path in paths.items()}
        except Exception as e:
            raise SpeechLMError(f"cannot load the compiled codec steps from {directory}: {str(e).splitlines()[0][:300]}") from None
        return cls(codec, packages["encode"], packages["decode"])

    def encode_step(self, pcm: Tensor, state: CodecState) -> tuple[Tensor, CodecState]:
        """As :meth:`Codec.encode_step`: pcm (B, frame_length) -> codes (B, G*R) int64, new state."""
        if pcm.ndim != 2 or pcm.shape != (state.batch_size, self.codec.frame_length):
            raise SpeechLMError(f"encode_step expects pcm of shape ({state.batch_size}, {self.codec.frame_length}), got {tuple(pcm.shape)}")
        with torch.inference_mode():
            out = self._encode(_dense(pcm.to(state.analysis), state.analysis, *state.encoder_stft, *state.encoder_frame))
        n = len(state.encoder_stft)
        return out[0], replace(state, analysis=out[1], encoder_stft=list(out[2 : 2 + n]), encoder_frame=list(out[2 + n :]))

    def decode_step(self, codes: Tensor, state: CodecState) -> tuple[Tensor, CodecState]:
        """As :meth:`Codec.decode_step`: codes (B, G*R) -> pcm (B, frame_length), new state."""
        self.codec.quantizer.check_codes(codes, frames_axis=False)
        if codes.shape[0] != state.batch_size:
            raise SpeechLMError(f"decode_step got codes for {codes.shape[0]} rows but the state holds {state.batch_size}")
        with torch.inference_mode():
            out = self._decode(_dense(codes.to(state.synthesis.device, torch.long), state.synthesis, *state.decoder_frame, *state.decoder_stft))
        n = len(state.decoder_frame)
        return out[0], replace(state, synthesis=out[1], decoder_frame=list(out[2 : 2 + n]), decoder_stft=list(out[2 + n :]))


def _flat_runner(package):
    """list of input tensors -> list of output tensors. Both programs take and return flat tuples of
    tensors, so the package's own pytree flattening (a fifth of a frame's time at batch 1) is skipped
    by calling its loader directly where this torch has one."""
    loader = getattr(package, "loader", None)
    if loader is not None and hasattr(loader, "run"):
        return loader.run
    return lambda inputs: package(*inputs)


def _dense(*tensors: Tensor) -> list[Tensor]:
    """Contiguous copies where needed: a compiled program reads its inputs with the strides it was
    exported with, and the eager steps return states as slices of larger buffers."""
    return [t.contiguous() for t in tensors]


def _step_programs(codec: Codec) -> dict[str, tuple[nn.Module, tuple[Tensor, ...]]]:
    """The two step modules with example inputs at batch 2 (a size the export can keep symbolic)."""
    encode, decode = _EncodeStep(codec).eval(), _DecodeStep(codec).eval()  # eval() drops the codebook cache
    state = codec.init_state(2)
    pcm = torch.zeros(2, codec.frame_length, device=state.analysis.device)
    codes = torch.zeros(2, codec.config.groups * codec.config.num_quantizers, dtype=torch.long, device=pcm.device)
    codec.encode_step(pcm, state)  # rebuilds it: the codebooks become constants of the programs
    return {
        "encode": (encode, (pcm, state.analysis, *state.encoder_stft, *state.encoder_frame)),
        "decode": (decode, (codes, state.synthesis, *state.decoder_frame, *state.decoder_stft)),
    }
