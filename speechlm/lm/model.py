"""SpeechLM: a Hugging Face causal LM extended to read and write audio frames, with MCTP heads.

    input_ids (B, L) ──text embedding──┐
    audio_codes (B, L, Q) ──AudioEmbedding (masked by audio_mask)──+──► backbone ──► h (B, L, D)
    h ──lm_head──► text logits (B, L, V)              next text token
    h ──audio head──► Q codes of position t + 1        next audio frame (offset 1)
    h, embed(x[t+1]) ──MCTP 1──► h1 ──audio head──►   frame at offset 2
    h1, embed(x[t+2]) ──MCTP 2──► h2 ──audio head──►  frame at offset 3 ... up to N + 1

See ``heads.py`` for how the two audio heads and the MCTP modules work, ``layout.py`` for
where codes sit in the sequence, ``generate.py`` for decoding.

Files (``save_pretrained`` / ``from_pretrained``)::

    dir/speechlm_config.json   SpeechLMConfig
    dir/speech.safetensors     audio embedding, audio head, MCTP modules
    dir/backbone/              the backbone, via transformers' save_pretrained
    dir/tokenizer/             the text tokenizer with the special tokens

Training stages (``set_stage``), after VITA-Audio's progressive recipe:

=========  ==================================================  ========================
stage      trains                                              loss
=========  ==================================================  ========================
text       backbone                                            text
align      backbone, audio embedding, audio head               text + audio
mctp1      MCTP module 1 (all else frozen)                     MCTP 1
mctp       every MCTP module (all else frozen)                 mean of MCTP losses
sft        everything                                          text + audio + MCTP
=========  ==================================================  ========================

With a hearing head (``SpeechLMConfig.hearing_layer``), every stage that trains the backbone
(align, sft) adds its CTC loss on heard speech (``hearing_mask`` / ``hearing_targets``), weighted
by ``hearing_loss_weight``; :meth:`SpeechLM.hear` transcribes with it in one forward.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from speechlm.codec.errors import SpeechLMError

from .adapters import AdapterConfig, LoRA, low_rank_factors, read_adapters, save_adapters, target_modules
from .config import CONFIG_NAME, SpeechLMConfig
from .heads import AudioEmbedding, DepthHead, HearingHead, MCTPModule, ParallelHead
from .int8 import Int8Products
from .layout import IGNORE, audio_targets, delay_frames, undelay_frames
from .lean import LeanOutput, lean_backbone
from .lean import supports as lean_supports
from .vocab import SpeechVocab, add_speech_tokens, load_tokenizer

WEIGHTS_NAME = "speech.safetensors"
BACKBONE_DIR = "backbone"
TOKENIZER_DIR = "tokenizer"
STAGES = ("text", "align", "mctp1", "mctp", "sft")


@dataclass
class SpeechLMOutput:
    """What :meth:`SpeechLM.forward` returns. Losses are None when not computed in this stage.

    ``loss`` is the weighted sum the current stage trains on. ``audio_logits`` /
    ``audio_targets`` (N, Q, C+1) / (N, Q) cover only the N positions that have audio targets.
    """

    loss: Tensor | None
    text_loss: Tensor | None
    audio_loss: Tensor | None
    codebook_losses: Tensor | None  # (Q,)
    mctp_losses: list[Tensor] = field(default_factory=list)  # per module, offset 2 .. N+1
    mctp_logits: list[Tensor] = field(default_factory=list)  # per module (N_i, Q, C+1), like audio_logits
    mctp_targets: list[Tensor] = field(default_factory=list)  # per module (N_i, Q)
    text_logits: Tensor | None = None  # (B, L, V)
    audio_logits: Tensor | None = None
    audio_targets: Tensor | None = None
    hidden: Tensor | None = None  # (B, L, D) backbone last hidden state
    hearing_loss: Tensor | None = None  # CTC loss of the hearing head (mean over rows with heard speech)


class SpeechLM(nn.Module):
    """A causal-LM backbone plus audio embedding, audio output head and MCTP modules.

    Build one with :meth:`from_backbone` (adds the special tokens, resizes embeddings) or
    :meth:`from_pretrained`; ``SpeechLM(config, backbone, tokenizer)`` expects a tokenizer
    that already has the special tokens.
    """

    def __init__(self, config: SpeechLMConfig, backbone: nn.Module, tokenizer):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.vocab = SpeechVocab.from_tokenizer(tokenizer, config)
        rows = backbone.get_input_embeddings().weight.shape[0]
        if self.vocab.size > rows:
            raise SpeechLMError(f"tokenizer has {self.vocab.size} tokens but the backbone embeds only {rows}; resize its embeddings")
        bc = backbone.config
        dim = bc.hidden_size
        init_std = float(getattr(bc, "initializer_range", 0.02))
        text_std = float(backbone.get_input_embeddings().weight.detach().float().std())
        Q, C = config.num_codebooks, config.codebook_size

        self.audio_embedding = AudioEmbedding(num_codebooks=Q, codebook_size=C, dim=dim, scale=config.audio_embed_scale, init_std=text_std)
        if config.output_head == "depth":
            self.audio_head = DepthHead(
                hidden_dim=dim,
                num_codebooks=Q,
                codebook_size=C,
                dim=config.depth_dim,
                num_layers=config.depth_layers,
                num_heads=config.depth_heads,
                init_std=init_std,
            )
        else:
            self.audio_head = ParallelHead(hidden_dim=dim, num_codebooks=Q, codebook_size=C, init_std=init_std)
        self.mctp = nn.ModuleList(
            MCTPModule(
                dim=dim,
                num_heads=bc.num_attention_heads,
                mlp_dim=config.mctp_intermediate_size or bc.intermediate_size,
                num_layers=config.mctp_layers,
                rope_theta=_rope_theta(bc),
                eps=float(getattr(bc, "rms_norm_eps", 1e-6)),
                init_std=init_std,
            )
            for _ in range(config.mctp_modules)
        )
        self.hearing: HearingHead | None = None
        if config.hearing_layer is not None:
            self.add_hearing_head(config.hearing_layer)
        self.adapters = nn.ModuleDict()  # task adapters by name (speechlm.lm.adapters); none active unless asked
        self._adapter_state = threading.local()  # the active adapter, per thread (see active_adapter)
        self._adapted: dict[nn.Module, str] = {}  # the layers whose forward an adapter can change -> their paths
        self._lean = lean_supports(self.backbone)  # inference forwards through speechlm.lm.lean
        self.int8: Int8Products | None = None  # int8 weight-only products for few rows (use_int8)
        self._int8_by_rows: dict[int, Int8Products] = {}  # one per row limit: each keeps its int8 copies
        self._int8_state = threading.local()  # this thread's override of self.int8 (int8_products)
        self.stage = "sft"

    # -- construction ----------------------------------------------------------------

    @classmethod
    def from_backbone(cls, backbone, tokenizer, config: SpeechLMConfig | None = None, **overrides) -> SpeechLM:
        """Extend a text LM: ``backbone`` is a transformers causal LM, a local directory holding one,
        or a transformers config (random weights); ``tokenizer`` a tokenizer or a local directory.

        Adds the special tokens to the tokenizer and resizes the backbone's embeddings
        (to a multiple of 64). ``overrides`` replace fields of ``config``.
        """
        from transformers import AutoModelForCausalLM, PretrainedConfig

        if isinstance(backbone, (str, os.PathLike)):
            backbone = _load_backbone(Path(backbone))
        elif isinstance(backbone, PretrainedConfig):
            backbone = AutoModelForCausalLM.from_config(backbone)
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        config = SpeechLMConfig(**{**(config.to_dict() if config else {}), **overrides})
        add_speech_tokens(tokenizer, config)
        if len(tokenizer) > backbone.get_input_embeddings().weight.shape[0]:
            backbone.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
        return cls(config, backbone, tokenizer)

    # -- properties ------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.backbone.get_input_embeddings().weight.device

    @property
    def hidden_size(self) -> int:
        return self.backbone.config.hidden_size

    # -- pieces used by training and generation ----------------------------------------

    def embed(self, input_ids: Tensor, audio_codes: Tensor | None = None, audio_mask: Tensor | None = None) -> Tensor:
        """(B, L) ids (+ (B, L, Q) codes at ``audio_mask``) -> input embeddings (B, L, D)."""
        embeds = self.backbone.get_input_embeddings()(input_ids)
        if audio_codes is not None and audio_mask is not None:
            codes = torch.where(audio_mask[..., None], audio_codes, self.config.empty_code)
            embeds = embeds + self.audio_embedding(codes).to(embeds.dtype) * audio_mask[..., None]
        return embeds

    def run_backbone(
        self,
        embeds: Tensor,
        *,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values=None,
        output_hidden_states: bool = False,
    ):
        """Backbone on input embeddings -> its output (``last_hidden_state``: (B, L, D), after the final norm;
        with ``output_hidden_states``, ``hidden_states[k]`` is the state after layer k, k < number of layers).

        ``attention_mask``: (B, S) padding mask, or a ready (B, 1, L, S) boolean mask used as is.

        ``past_key_values``: a transformers Cache, updated in place. transformers >= 5.2x names that
        argument ``cache`` (``past_key_values`` is deprecated there); older 5.x only knows ``past_key_values``.

        Without gradients and hidden states, a Llama or Qwen2 backbone runs through
        :func:`speechlm.lm.lean.lean_backbone` (the same arithmetic, without the transformers layers' Python).
        """
        if self._lean and not output_hidden_states and not torch.is_grad_enabled():
            products = getattr(self._int8_state, "products", self.int8)
            hidden = lean_backbone(self.backbone, embeds, attention_mask, position_ids, past_key_values, self._inference_weight(), products)
            return LeanOutput(hidden)
        base = self.backbone.base_model
        cache_arg = _cache_argument(type(base))
        return base(
            inputs_embeds=embeds,
            attention_mask=attention_mask if attention_mask is None or attention_mask.ndim == 4 else attention_mask.long(),
            position_ids=position_ids,
            use_cache=past_key_values is not None,
            output_hidden_states=output_hidden_states,
            **{cache_arg: past_key_values},
        )

    def text_logits(self, hidden: Tensor) -> Tensor:
        return self.backbone.get_output_embeddings()(hidden)

    def audio_layout(self, frames: Tensor) -> Tensor:
        """Frames (F, Q) -> the codes of a speech segment's positions (delayed for the parallel head)."""
        if self.config.output_head == "depth":
            return frames
        return delay_frames(frames, self.config.audio_delays, self.config.empty_code)

    def frames_from_layout(self, layout: Tensor) -> Tensor:
        """Inverse of :meth:`audio_layout`."""
        if self.config.output_head == "depth":
            return layout
        return undelay_frames(layout, self.config.audio_delays)

    def keep_mctp_modules(self, n: int) -> None:
        """Keep only the first ``n`` MCTP modules (the chain stays valid: module i only reads module
        i - 1). A duplex model, which decodes one frame per step, ships with ``n = 0``."""
        if not 0 <= n <= len(self.mctp):
            raise SpeechLMError(f"this model has {len(self.mctp)} MCTP modules; cannot keep {n}")
        self.mctp = self.mctp[:n]
        self.config.mctp_modules = n
        if self.config.mctp_schedule:
            self.config.mctp_schedule = [min(s, n) for s in self.config.mctp_schedule]

    def add_hearing_head(self, layer: int) -> None:
        """Give the model a (fresh) CTC hearing head on the hidden state after backbone layer ``layer``."""
        layers = int(self.backbone.config.num_hidden_layers)
        if not 1 <= layer <= layers:
            raise SpeechLMError(f"hearing_layer must be in [1, {layers}] for this {layers}-layer backbone, got {layer}")
        bc = self.backbone.config
        weight = self.backbone.get_input_embeddings().weight
        self.hearing = HearingHead(
            dim=bc.hidden_size, eps=float(getattr(bc, "rms_norm_eps", 1e-6)), init_std=float(getattr(bc, "initializer_range", 0.02))
        ).to(device=weight.device, dtype=weight.dtype)
        self.config.hearing_layer = layer

    def _hearing_head(self) -> HearingHead:
        if self.hearing is None:
            raise SpeechLMError(
                "this speech LM has no hearing head (its config sets no hearing_layer): transcribe with the LM (asr decoder 'lm')"
            )
        return self.hearing

    def hearing_logits(self, layer_hidden: Tensor) -> Tensor:
        """Hidden states after layer ``hearing_layer`` (..., D) -> CTC logits over the text vocabulary (..., V)."""
        return self.text_logits(self._hearing_head()(layer_hidden))

    @torch.no_grad()
    def hear(self, frames: Tensor) -> list[int]:
        """Greedy CTC transcription of one utterance: frames (F, Q) -> text token ids.

        One backbone forward over the ASR prompt (``<|asr|> <|speech_start|> AUDIO``), the hearing
        head at its audio positions, best class per position, repeats merged, blanks dropped.
        """
        from .generate import PromptBatch  # both import this module
        from .prompts import asr_prompt

        self._hearing_head()  # no head: a clear error before the forward
        prompt = PromptBatch.build(self, *asr_prompt(self, frames))
        audio_mask = prompt.audio_mask.to(self.device)
        embeds = self.embed(prompt.input_ids.to(self.device), prompt.audio_codes.to(self.device), audio_mask)
        states = self.run_backbone(embeds, output_hidden_states=True).hidden_states
        logits = self.hearing_logits(states[self.config.hearing_layer][audio_mask])  # (P, V)
        return ctc_greedy(logits.argmax(-1).tolist(), blank=self.vocab.text_pad)

    # -- training ----------------------------------------------------------------------

    # -- task adapters (speechlm.lm.adapters) ------------------------------------------------

    @property
    def active_adapter(self) -> str | None:
        """The adapter this thread's forwards add (None: the base model). Per thread, so that one
        thread transcribing through an adapter never changes what another thread's speech computes."""
        return getattr(self._adapter_state, "name", None)

    @active_adapter.setter
    def active_adapter(self, name: str | None) -> None:
        self._adapter_state.name = name

    def add_adapter(self, config: AdapterConfig) -> LoRA:
        """A new adapter (its update starts at zero) on the layers ``config.targets`` name."""
        if config.name in self.adapters:
            raise SpeechLMError(f"this model already has an adapter named {config.name!r}")
        layers = target_modules(self, config.targets)
        if not layers:
            raise SpeechLMError(f"adapter {config.name!r}: no linear or embedding layer matches {', '.join(config.targets)}")
        lora = LoRA(config, layers)
        self.adapters[config.name] = lora
        me = weakref.ref(self)
        for path, layer in layers.items():
            if layer not in self._adapted:  # the layer's own forward, wrapped (weights and names stay the base's)
                layer.forward = functools.partial(_adapted_forward, me, path, layer.forward)
                self._adapted[layer] = path
        return lora

    def reduce_adapter_rank(self, name: str, rank: int) -> LoRA:
        """Replace adapter ``name`` by the best approximation of rank ``rank`` of its updates
        (:func:`low_rank_factors`; its size falls by rank / old rank); returns the new one."""
        if name not in self.adapters:
            raise SpeechLMError(f"this model has no adapter {name!r}")
        old = self.adapters[name]
        if not 1 <= rank <= old.config.rank:
            raise SpeechLMError(f"adapter {name!r} has rank {old.config.rank}: a lower rank is 1 .. {old.config.rank}, got {rank}")
        if rank == old.config.rank:
            return old
        factors = low_rank_factors(old, rank)
        config = AdapterConfig(name, rank=rank, alpha=float(rank), targets=old.config.targets,
                               description=f"{old.config.description}; rank {old.config.rank} reduced to {rank} (SVD)".lstrip("; "))
        del self.adapters[name]
        lora = self.add_adapter(config)
        lora.load_state_dict(factors)
        return lora

    def remove_adapter(self, name: str) -> None:
        """Forget adapter ``name`` (its layers' wrapped forwards stay and add nothing)."""
        if name not in self.adapters:
            raise SpeechLMError(f"this model has no adapter {name!r}")
        del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = None

    @property
    def int8_computes(self) -> bool:
        """Whether int8 products change anything here: a Llama or Qwen2 backbone computed in bfloat16 on a CPU."""
        return self._lean and self.backbone.dtype == torch.bfloat16 and self.device.type == "cpu"

    def use_int8(self, max_rows: int | None = 4) -> SpeechLM:
        """Inference products of at most ``max_rows`` rows in the backbone read its weights as int8
        (:mod:`speechlm.lm.int8`: bfloat16 compute on a CPU, a Llama or Qwen2 backbone); None turns it off.
        Faster decoding of one or a few rows, with outputs rounded differently."""
        self.int8 = self._int8_products(max_rows)
        return self

    @contextlib.contextmanager
    def int8_products(self, max_rows: int | None):
        """Inside the block, this thread's forwards use int8 products of at most ``max_rows`` rows (as
        :meth:`use_int8`; None: none), whatever the model's own setting; other threads are not affected."""
        before = getattr(self._int8_state, "products", _UNSET)
        self._int8_state.products = self._int8_products(max_rows)
        try:
            yield self
        finally:
            if before is _UNSET:
                del self._int8_state.products
            else:
                self._int8_state.products = before

    def _int8_products(self, max_rows: int | None) -> Int8Products | None:
        if max_rows is None:
            return None
        if not self._lean:
            raise SpeechLMError(f"int8 products need a Llama or Qwen2 backbone ({type(self.backbone).__name__} runs transformers' own forward)")
        if max_rows not in self._int8_by_rows:
            self._int8_by_rows[max_rows] = Int8Products(max_rows)
        return self._int8_by_rows[max_rows]

    def _inference_weight(self):
        """For :func:`lean_backbone`: the weight a layer computes with now — the active adapter's merged
        weight where the adapter covers the layer — or None when no adapter is on (every layer its own)."""
        name = self.active_adapter
        if name is None or name not in self.adapters:
            return None
        lora, paths = self.adapters[name], self._adapted

        def weight(layer: nn.Module) -> Tensor:
            path = paths.get(layer)
            return lora.merged_weight(path, layer) if path is not None and lora.covers(path) else layer.weight

        return weight

    @contextlib.contextmanager
    def adapter(self, name: str | None):
        """Forwards inside the block add adapter ``name``'s update (None: no adapter)."""
        if name is not None and name not in self.adapters:
            raise SpeechLMError(f"this model has no adapter {name!r} (it has: {', '.join(self.adapters) or 'none'})")
        before, self.active_adapter = self.active_adapter, name
        try:
            yield self
        finally:
            self.active_adapter = before

    def train_adapter(self, name: str) -> list[str]:
        """Freeze everything but adapter ``name`` and switch it on; return the trainable names."""
        if name not in self.adapters:
            raise SpeechLMError(f"this model has no adapter {name!r}")
        self.requires_grad_(False)
        self.adapters[name].requires_grad_(True)
        self.active_adapter = name
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def set_stage(self, stage: str) -> list[str]:
        """Freeze everything but what ``stage`` trains (see the module docstring); return the trainable names."""
        if stage not in STAGES:
            raise SpeechLMError(f"unknown training stage {stage!r}; choose from {', '.join(STAGES)}")
        if stage in ("mctp1", "mctp") and not self.mctp:
            raise SpeechLMError(f"stage {stage!r} needs MCTP modules, but this model has mctp_modules=0")
        trainable = {
            "text": [self.backbone],
            "align": [self.backbone, self.audio_embedding, self.audio_head, *([self.hearing] if self.hearing is not None else [])],
            "mctp1": list(self.mctp[:1]),
            "mctp": list(self.mctp),
            "sft": [self],
        }[stage]
        self.requires_grad_(False)
        for module in trainable:
            module.requires_grad_(True)
        self.stage = stage
        return [name for name, p in self.named_parameters() if p.requires_grad]

    def forward(
        self,
        input_ids: Tensor,
        audio_codes: Tensor | None = None,
        audio_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        audio_loss_mask: Tensor | None = None,
        hearing_mask: Tensor | None = None,
        hearing_targets: Tensor | None = None,
        *,
        all_losses: bool = False,
    ) -> SpeechLMOutput:
        """Training forward: teacher-forced losses for the current stage.

        input_ids (B, L): text tokens (``<|audio|>`` at audio positions); audio_codes (B, L, Q) in
        ``[0, C]`` (C = empty), read only where audio_mask (B, L) is True; attention_mask (B, L)
        (default all ones); labels (B, L): text targets aligned with the inputs (shifted inside;
        -100 = ignore; default input_ids at attended positions); audio_loss_mask (B, L): which
        audio positions are targets (default all). hearing_mask (B, L): the heard-speech positions
        the hearing head transcribes, hearing_targets (B, S): each row's transcript (text token ids,
        -100 after its end; a row with no heard speech has none); used only by a model with a hearing
        head. ``all_losses``: also compute the losses the stage does not train on (for logging).
        """
        input_ids, audio_codes, audio_mask, attention_mask = self._check_inputs(input_ids, audio_codes, audio_mask, attention_mask, labels)
        labels = None if labels is None else labels.long().to(self.device)
        stage = self.stage
        want_text = all_losses or stage in ("text", "align", "sft")
        want_audio = all_losses or stage in ("align", "sft")
        want_mctp = [all_losses or stage in ("mctp", "sft") or (stage == "mctp1" and i == 0) for i in range(len(self.mctp))]
        if audio_codes is None:
            want_audio, want_mctp = False, [False] * len(self.mctp)

        want_hearing = (
            self.hearing is not None
            and hearing_mask is not None
            and hearing_targets is not None
            and (all_losses or stage in ("align", "sft"))
            and bool(hearing_mask.any())
        )

        embeds = self.embed(input_ids, audio_codes, audio_mask)
        position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        adapter = self.adapters[self.active_adapter] if self.active_adapter in self.adapters else None
        backbone_trains = any(p.requires_grad for p in self.backbone.parameters()) or (
            adapter is not None and any(p.requires_grad for p in adapter.parameters())
        )
        with torch.set_grad_enabled(torch.is_grad_enabled() and backbone_trains):
            result = self.run_backbone(embeds, attention_mask=attention_mask, position_ids=position_ids, output_hidden_states=want_hearing)
            hidden = result.last_hidden_state

        out = SpeechLMOutput(loss=None, text_loss=None, audio_loss=None, codebook_losses=None, hidden=hidden)
        losses = []
        if want_hearing:
            layer_hidden = result.hidden_states[self.config.hearing_layer]
            out.hearing_loss = self._hearing_loss(layer_hidden, hearing_mask.to(self.device).bool() & attention_mask, hearing_targets)
            if stage in ("align", "sft"):
                losses.append(self.config.hearing_loss_weight * out.hearing_loss)
        if want_text:
            out.text_logits = self.text_logits(hidden)
            if labels is None:
                labels = torch.where(attention_mask, input_ids, IGNORE)
            shifted = out.text_logits[:, :-1].flatten(0, 1).float()
            out.text_loss = (
                F.cross_entropy(shifted, labels[:, 1:].flatten(), ignore_index=IGNORE)
                if (labels[:, 1:] != IGNORE).any()
                else hidden.sum() * 0
            )
            if stage in ("text", "align", "sft"):
                losses.append(self.config.text_loss_weight * out.text_loss)
        if want_audio:
            out.codebook_losses, out.audio_logits, out.audio_targets = self._audio_loss(
                hidden, audio_codes, audio_mask, audio_loss_mask, offset=1
            )
            out.audio_loss = self._weighted_codebooks(out.codebook_losses)
            if stage in ("align", "sft"):
                losses.append(self.config.audio_loss_weight * out.audio_loss)
        if any(want_mctp):
            valid = attention_mask
            h = hidden
            L = input_ids.shape[1]
            for i, module in enumerate(self.mctp, start=1):
                if not any(want_mctp[i - 1 :]) or L - i < 2:
                    break
                h, normed = module(h[:, : L - i], embeds[:, i:], position_ids[:, : L - i], valid=valid[:, : L - i])
                codebook_losses, logits, targets = self._audio_loss(normed, audio_codes, audio_mask, audio_loss_mask, offset=i + 1)
                out.mctp_losses.append(self._weighted_codebooks(codebook_losses))
                out.mctp_logits.append(logits)
                out.mctp_targets.append(targets)
            trained = [loss for i, loss in enumerate(out.mctp_losses) if stage in ("mctp", "sft") or (stage == "mctp1" and i == 0)]
            if trained:
                losses.append(self.config.mctp_loss_weight * torch.stack(trained).mean())
        out.loss = torch.stack(losses).sum() if losses else None
        return out

    def _hearing_loss(self, layer_hidden: Tensor, mask: Tensor, targets: Tensor) -> Tensor:
        """CTC of each row's heard positions (``mask`` (B, L)) against its transcript (``targets`` (B, S));
        mean over the rows that have both (per-row loss divided by its transcript length, as ``ctc_loss``'s mean)."""
        targets = targets.long().to(self.device)
        input_lengths = mask.sum(1)
        target_lengths = (targets != IGNORE).sum(1)
        rows = (input_lengths > 0) & (target_lengths > 0)
        if not rows.any():
            return layer_hidden.sum() * 0
        mask, targets = mask[rows], targets[rows]
        input_lengths, target_lengths = input_lengths[rows], target_lengths[rows]
        T = int(input_lengths.max())
        # Heard positions of each row, packed to the left: (R, T, D).
        order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :T]
        picked = torch.gather(layer_hidden[rows], 1, order[..., None].expand(-1, -1, layer_hidden.shape[-1]))
        log_probs = F.log_softmax(self.hearing_logits(picked).float(), dim=-1).transpose(0, 1)  # (T, R, V)
        return F.ctc_loss(
            log_probs,
            targets.clamp(min=0),
            input_lengths,
            target_lengths,
            blank=self.vocab.text_pad,
            reduction="mean",
            zero_infinity=True,
        )

    def _audio_loss(self, hidden: Tensor, codes: Tensor, audio_mask: Tensor, loss_mask: Tensor | None, *, offset: int):
        """Per-codebook CE of predicting the codes at ``offset`` from ``hidden`` (B, L', D), L' >= L - offset."""
        targets = audio_targets(
            codes, audio_mask, offset=offset, delays=self.config.audio_delays, empty=self.config.empty_code, loss_mask=loss_mask
        )
        rows = (targets != IGNORE).any(-1)  # (B, L - offset): positions with something to learn
        selected_targets = targets[rows]  # (N, Q)
        logits = self.audio_head(hidden[:, : targets.shape[1]][rows], selected_targets)  # (N, Q, C+1)
        per_code = F.cross_entropy(logits.flatten(0, 1).float(), selected_targets.flatten(), ignore_index=IGNORE, reduction="none")
        per_code = per_code.view_as(selected_targets)
        counts = (selected_targets != IGNORE).sum(0)
        codebook_losses = per_code.sum(0) / counts.clamp(min=1)  # (Q,); 0 for a codebook with no targets
        return codebook_losses, logits, selected_targets

    def _weighted_codebooks(self, codebook_losses: Tensor) -> Tensor:
        weights = self.config.codebook_loss_weights
        if weights is None:
            return codebook_losses.mean()
        w = torch.tensor(weights, dtype=codebook_losses.dtype, device=codebook_losses.device)
        return (codebook_losses * w).sum() / w.sum()

    def _check_inputs(self, input_ids, audio_codes, audio_mask, attention_mask, labels):
        if not isinstance(input_ids, Tensor) or input_ids.ndim != 2 or input_ids.dtype not in (torch.long, torch.int, torch.int32):
            shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise SpeechLMError(f"input_ids must be an integer tensor of shape (batch, length), got {shape}")
        B, L = input_ids.shape
        if L == 0 or B == 0:
            raise SpeechLMError("input_ids is empty")
        input_ids = input_ids.long().to(self.device)
        check_token_ids(input_ids, self.backbone.get_input_embeddings().weight.shape[0])
        if attention_mask is None:
            attention_mask = torch.ones(B, L, dtype=torch.bool, device=self.device)
        elif tuple(attention_mask.shape) != (B, L):
            raise SpeechLMError(f"attention_mask must have shape {(B, L)}, got {tuple(attention_mask.shape)}")
        attention_mask = attention_mask.to(self.device).bool()
        if labels is not None and tuple(labels.shape) != (B, L):
            raise SpeechLMError(f"labels must have shape {(B, L)}, got {tuple(labels.shape)}")
        if audio_codes is None:
            if audio_mask is not None and audio_mask.any():
                raise SpeechLMError("audio_mask marks audio positions but no audio_codes were given")
            return input_ids, None, None, attention_mask
        if audio_mask is None:
            audio_mask = input_ids == self.vocab.audio
        if tuple(audio_mask.shape) != (B, L):
            raise SpeechLMError(f"audio_mask must have shape {(B, L)}, got {tuple(audio_mask.shape)}")
        audio_mask = audio_mask.to(self.device).bool() & attention_mask
        check_codes(audio_codes, self.config, leading=(B, L), mask=audio_mask)
        return input_ids, audio_codes.long().to(self.device), audio_mask, attention_mask

    # -- files -----------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the config, the speech weights, the backbone and the tokenizer into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(str(directory / BACKBONE_DIR))
        self.tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
        tensors = {
            name: t.detach().cpu().contiguous() for name, t in self.state_dict().items() if not name.startswith(("backbone.", "adapters."))
        }
        weights = directory / WEIGHTS_NAME
        tmp = weights.with_name(f".{weights.name}.tmp{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"format": "speechlm", "output_head": self.config.output_head})
        os.replace(tmp, weights)
        save_adapters(self.adapters, directory)
        self.config.save(directory)
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> SpeechLM:
        """Load a directory written by :meth:`save_pretrained`; returns the model in eval mode."""
        directory = Path(directory)
        if not directory.is_dir():
            raise SpeechLMError(f"speech LM directory not found: {directory}")
        if not (directory / CONFIG_NAME).is_file():
            raise SpeechLMError(f"{directory} is not a speech LM directory: it has no {CONFIG_NAME}")
        config = SpeechLMConfig.load(directory)
        tokenizer = load_tokenizer(directory / TOKENIZER_DIR)
        backbone = _load_backbone(directory / BACKBONE_DIR)
        model = cls(config, backbone, tokenizer).to(backbone.dtype)  # speech modules in the backbone's dtype
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise SpeechLMError(f"speech LM weights not found: {weights}")
        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError) as e:
            raise SpeechLMError(f"cannot read speech LM weights {weights} (corrupt or not safetensors): {e}") from None
        try:
            missing, unexpected = model.load_state_dict(tensors, strict=False)
        except RuntimeError as e:
            raise SpeechLMError(f"speech LM weights {weights} do not match its config: {str(e).splitlines()[0]}") from None
        missing = [name for name in missing if not name.startswith("backbone.")]
        if missing or unexpected:
            raise SpeechLMError(f"speech LM weights {weights} do not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for adapter_config, adapter_tensors in read_adapters(directory):
            lora = model.add_adapter(adapter_config)
            try:
                lora.load_state_dict(adapter_tensors)
            except RuntimeError as e:
                raise SpeechLMError(f"adapter {adapter_config.name!r} does not fit this model: {str(e).splitlines()[0]}") from None
        if dtype is not None:
            model = model.to(dtype)
        return model.to(device).eval()


_UNSET = object()


def _adapted_forward(model_ref, path: str, base_forward, x: Tensor) -> Tensor:
    """An adapted layer's forward: the base layer's, with the active adapter's update if it covers the
    layer — added to the base output where gradients may flow (training), else computed in one product
    with the adapter merged into the layer's weight (:meth:`LoRA.merged_weight`: no extra products, so an
    adapter costs nothing at inference)."""
    model = model_ref()
    name = model.active_adapter if model is not None else None
    if name is None or name not in model.adapters or not model.adapters[name].covers(path):
        return base_forward(x)
    lora, layer = model.adapters[name], base_forward.__self__
    if torch.is_grad_enabled():
        output = base_forward(x)
        return output + lora.delta(path, layer, x).to(output.dtype)
    weight = lora.merged_weight(path, layer)
    if isinstance(layer, nn.Embedding):
        return F.embedding(x, weight, layer.padding_idx, layer.max_norm, layer.norm_type, layer.scale_grad_by_freq, layer.sparse)
    return F.linear(x, weight, layer.bias)


def ctc_greedy(best: list[int], *, blank: int) -> list[int]:
    """Best class per position -> labels: repeats merged, blanks dropped (CTC's greedy decoding)."""
    labels, previous = [], None
    for label in best:
        if label != previous and label != blank:
            labels.append(label)
        previous = label
    return labels


def check_token_ids(ids: Tensor, vocab_rows: int) -> None:
    if ids.numel():
        low, high = torch.aminmax(ids)
        if low < 0 or high >= vocab_rows:
            raise SpeechLMError(f"token ids must lie in [0, {vocab_rows}), got values in [{int(low)}, {int(high)}]")


def check_codes(codes, config: SpeechLMConfig, *, leading: tuple[int, ...], mask: Tensor | None = None) -> None:
    """Raise SpeechLMError unless ``codes`` has shape ``leading + (Q,)`` with ints in [0, C] where ``mask``."""
    Q, C = config.num_codebooks, config.codebook_size
    expected = (*leading, Q)
    if not isinstance(codes, Tensor):
        raise SpeechLMError(f"audio codes must be a torch tensor of shape {expected}, got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise SpeechLMError(f"audio codes must be integers, got dtype {codes.dtype}")
    if tuple(codes.shape) != expected:
        if codes.ndim == len(expected) and codes.shape[-1] != Q:
            raise SpeechLMError(f"audio codes have {codes.shape[-1]} codebooks per frame but this model reads {Q}")
        raise SpeechLMError(f"audio codes must have shape {expected}, got {tuple(codes.shape)}")
    values = codes if mask is None else codes[mask.to(codes.device)]
    if values.numel():
        low, high = torch.aminmax(values)
        if low < 0 or high > C:
            raise SpeechLMError(f"audio codes must lie in [0, {C}) (or {C} = empty), got values in [{int(low)}, {int(high)}]")


def _rope_theta(backbone_config) -> float:
    theta = getattr(backbone_config, "rope_theta", None)
    if theta is None:
        theta = (getattr(backbone_config, "rope_parameters", None) or {}).get("rope_theta", 10_000.0)
    return float(theta)


def _load_backbone(path: Path):
    from transformers import AutoModelForCausalLM

    if not path.is_dir() or not (path / "config.json").is_file():
        raise SpeechLMError(f"backbone not found: {path} is not a directory with a config.json")
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise SpeechLMError(f"cannot load the backbone from {path}: {str(e).splitlines()[0]}") from None


@functools.cache
def _cache_argument(backbone_class: type) -> str:
    """The keyword under which ``backbone_class.forward`` takes its KV cache."""
    return "cache" if "cache" in inspect.signature(backbone_class.forward).parameters else "past_key_values"
