"""Backbone adapters: the one interface RMT and ARMT use to drive a decoder.

A memory wrapper needs five things from the model it wraps: the input embeddings, a run
over embeddings with explicit position ids (and optionally a KV cache), the final norm, the
LM head and the list of decoder layers (ARMT patches each layer with an associative
memory). `MemlmBackbone` provides them for a memlm architecture from the registry,
`HFBackbone` for any Hugging Face causal LM; `wrap()` turns an existing HF model into an
RMT or ARMT in place, and `load_pretrained()` reads one from a folder or the hub for
`model.backbone: hf:PATH_OR_NAME` (docs/finetune.md).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from memlm.errors import ConfigError, MissingDependencyError
from memlm.memory.associative import (
    find_layers,
)
from memlm.models.base import ForwardContext, MemLM
from memlm.models.decoder import Decoder

if TYPE_CHECKING:
    from memlm.models.recurrent import RecurrentConfig

#: ModelConfig fields a memlm backbone inherits from the wrapper's config
SHARED_FIELDS = ("vocab_size", "n_layer", "n_head", "d_model", "dropout", "pos_emb", "rope_theta",
                 "ffn_mult", "bias", "tie_embeddings", "norm_eps", "init_std")


# ----- backbone adapters -------------------------------------------------------------------


class SegmentKV(NamedTuple):
    """The previous segment's text keys and values, per layer (RMT/ARMT `sliding_window`).

    Carried in the memory state so that every reader (forward, `read_segments`,
    generation) lets a segment attend to the one before it. Detached, memory tokens
    excluded, in the dtype the backbone computed them in.
    """

    keys: tuple[torch.Tensor, ...]  #: per layer [B, H_kv, T, Dh]
    values: tuple[torch.Tensor, ...]  #: per layer [B, H_kv, T, Dh]
    mask: torch.Tensor  #: [B, T] bool: True where a real token may be attended to

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])


class Backbone(nn.Module):
    """A causal LM seen through the few operations segment recurrence needs."""

    model: nn.Module

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.input_embeddings()(ids)

    def input_embeddings(self) -> nn.Embedding:
        raise NotImplementedError

    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def run(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: Any = None,
            ctx: ForwardContext | None = None, want_pre: bool = False,
            shift: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Run on embeddings with positions restarting at 0 (or after `cache`).

        With a non-empty `cache`, `attention_mask` (if given) covers the cached tokens and
        `x`; `shift` [B] moves each row's positions back (a row whose cached tokens are all
        masked starts at 0 again, as a fresh row would).
        Returns (last layer output before the final norm or None, after the final norm).
        """
        raise NotImplementedError

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def new_kv_cache(self, batch_size: int, device: torch.device) -> Any:
        raise NotImplementedError

    def window_cache(self, batch_size: int, device: torch.device,
                     past: SegmentKV | None) -> Any:
        """A KV cache holding `past` (the previous segment's keys and values; None: empty)
        whose every layer keeps all it is given, so `cached_kv` finds a segment's keys."""
        raise NotImplementedError

    def cached_kv(self, cache: Any, start: int, end: int
                  ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Keys and values of cache positions [start, end) of every layer."""
        raise NotImplementedError


class MemlmBackbone(Backbone):
    """A memlm decoder model (gpt, or any stateless arch built on `Decoder`)."""

    def __init__(self, model: MemLM):
        super().__init__()
        decoder = getattr(model, "decoder", None)
        if not isinstance(decoder, Decoder) or getattr(model, "is_stateful", False):
            raise ConfigError(
                f"memlm arch {model.config.arch!r} cannot be a recurrent backbone: it needs a "
                "stateless model built on memlm's Decoder (e.g. backbone: gpt)."
            )
        self.model = model
        self.layers_path = "decoder.blocks"

    @property
    def decoder(self) -> Decoder:
        return self.model.decoder

    def input_embeddings(self) -> nn.Embedding:
        return self.decoder.wte

    def layers(self) -> nn.ModuleList:
        return self.decoder.blocks

    def run(self, x, attention_mask=None, cache=None, ctx=None, want_pre=False, shift=None):
        # memlm attention has no padding mask: padded positions run as ordinary tokens,
        # which cannot change the logits of earlier (real) positions of a causal model
        if shift is not None and bool(shift.any()):
            raise ConfigError(
                "sliding_window with a memlm backbone cannot hide the previous segment from "
                "some rows only (memlm attention has no key mask); reset every row at once, "
                "or use a transformers backbone (backbone: hf:PATH).")
        dec = self.decoder
        x = dec.add_positions(x, cache.length if cache is not None else 0)
        x = dec.run_blocks(x, ctx if ctx is not None else ForwardContext(), cache)
        return x, dec.ln_f(x)

    def logits(self, hidden):
        return self.decoder.lm_head(hidden)

    def new_kv_cache(self, batch_size, device):
        return self.decoder.make_cache(batch_size, self.decoder.config.context_len, device)

    def window_cache(self, batch_size, device, past):
        cache = self.new_kv_cache(batch_size, device)
        if past is not None:
            for layer, k, v in zip(cache.layers, past.keys, past.values):
                layer.append(k, v)
        return cache

    def cached_kv(self, cache, start, end):
        return (tuple(layer.k[:, :, start:end] for layer in cache.layers),
                tuple(layer.v[:, :, start:end] for layer in cache.layers))


class HFBackbone(Backbone):
    """A Hugging Face causal LM (GPT-2, Llama, Mistral, Qwen2, GPT-NeoX, OPT, ...)."""

    def __init__(self, model: nn.Module, layers_attr: str | None = None):
        super().__init__()
        self.model = model
        self.layers_path, _ = find_layers(model, layers_attr)

    def input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def layers(self) -> nn.ModuleList:
        return find_layers(self.model, self.layers_path)[1]

    def run(self, x, attention_mask=None, cache=None, ctx=None, want_pre=False, shift=None):
        b, n, _ = x.shape
        start = cache.get_seq_length() if cache is not None else 0
        pos = torch.arange(start, start + n, device=x.device).unsqueeze(0).expand(b, n)
        if shift is not None:
            pos = pos - shift.to(pos.device)[:, None]
        captured: dict[str, torch.Tensor] = {}
        handle = None
        if want_pre:
            def grab(module, args, output):
                captured["pre"] = output[0] if isinstance(output, tuple) else output
            handle = self.layers()[-1].register_forward_hook(grab)
        try:
            out = self.model.base_model(
                inputs_embeds=x, position_ids=pos, attention_mask=attention_mask,
                cache=cache, use_cache=cache is not None,
            )
        finally:
            if handle is not None:
                handle.remove()
        return captured.get("pre"), out.last_hidden_state

    def logits(self, hidden):
        return self.model.get_output_embeddings()(hidden)

    def new_kv_cache(self, batch_size, device):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def window_cache(self, batch_size, device, past):
        from transformers import DynamicCache

        # no config: full layers only (never a sliding-window layer that drops keys)
        if past is None:
            return DynamicCache()
        return DynamicCache(ddp_cache_data=list(zip(past.keys, past.values)))

    def cached_kv(self, cache, start, end):
        layers = cache.layers
        if any(layer.keys.shape[-2] < end for layer in layers):
            raise ConfigError("sliding_window: the backbone's KV cache dropped tokens (a "
                              "sliding-window attention layer?); use a model without one.")
        return (tuple(layer.keys[:, :, start:end] for layer in layers),
                tuple(layer.values[:, :, start:end] for layer in layers))

    def max_positions(self) -> int | None:
        """Learned absolute position tables (GPT-2's n_positions) cap the backbone window."""
        return getattr(self.model.config, "n_positions", None)


def build_memlm_backbone(config: RecurrentConfig, extra: int) -> MemLM:
    from memlm.registry import ARCHITECTURES

    spec = ARCHITECTURES.get(config.backbone)
    data = {k: getattr(config, k) for k in SHARED_FIELDS}
    data.update(config.backbone_config)
    data.update(arch=config.backbone, context_len=config.segment_len + extra)
    sub = spec.config_cls.from_dict(data, where=f"backbone_config (arch {config.backbone!r})")
    return spec.model_cls(sub)


def build_hf_backbone(config: RecurrentConfig) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    data = dict(config.backbone_config)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ConfigError(
            "backbone 'hf' needs backbone_config with the Hugging Face config dict (including "
            "model_type); build such models with memlm.wrap(kind, hf_model)."
        )
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **data))


# ----- pretrained Hugging Face backbones (`backbone: hf:PATH_OR_NAME`) -----------------------

#: the backbone prefix that names a pretrained transformers causal LM
PRETRAINED_PREFIX = "hf:"


def pretrained_source(backbone: str) -> str | None:
    """PATH_OR_NAME of a `hf:PATH_OR_NAME` backbone; None for every other backbone."""
    if isinstance(backbone, str) and backbone.startswith(PRETRAINED_PREFIX):
        return backbone[len(PRETRAINED_PREFIX):].strip()
    return None


def _looks_local(source: str) -> bool:
    """A path, not a hub id ("gpt2", "org/name"): it exists or is spelled like a path."""
    return (Path(source).expanduser().exists() or source.startswith(("/", ".", "~"))
            or source.count("/") > 1 or os.sep != "/" and os.sep in source)


def load_pretrained(config: RecurrentConfig) -> tuple[nn.Module, RecurrentConfig]:
    """Load `config.backbone = hf:PATH_OR_NAME` and the config the wrapper keeps.

    The model comes from `AutoModelForCausalLM.from_pretrained` (a local folder works
    offline; a hub name needs the network or the local HF cache), in float32 (bf16 runs
    use autocast, `train.precision: bf16`), from safetensors files only (a pickled
    `pytorch_model.bin` could execute code) and never with remote code.

    The returned config is a copy with `backbone: hf`, the full HF config in
    `backbone_config` and the source in `backbone_source`: a saved memlm model therefore
    rebuilds the backbone from its own config.json and weights, without the original
    folder. The caller's config is left as it is (a run's run.yaml keeps `hf:PATH`).
    """
    source = pretrained_source(config.backbone)
    if not source:
        raise ConfigError("backbone 'hf:' needs a folder or hub name after the colon, e.g. "
                          "backbone: hf:gpt2 or backbone: hf:/models/Llama-3.2-1B.")
    local = _looks_local(source)
    if local:
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"backbone hf:{source}: no such folder; give a folder written by "
                              "save_pretrained (config.json + model.safetensors) or a hub name.")
        if not (folder / "config.json").is_file():
            raise ConfigError(f"backbone hf:{source}: the folder holds no config.json; it is not "
                              "a transformers model folder (save_pretrained writes one).")
        source = str(folder)
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch.float32, use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = "the folder" if local else "the hub name (no network, or no such model?)"
        raise ConfigError(f"backbone hf:{source}: transformers could not load a causal LM from "
                          f"{where}: {first}") from e
    hf = model.config
    if config.vocab_size > hf.vocab_size:
        raise ConfigError(
            f"backbone hf:{source} has {hf.vocab_size} token ids but the tokenizer needs "
            f"{config.vocab_size}; use the model's own tokenizer (data.tokenizer: hf:{source}).")
    backbone_config = json.loads(hf.to_json_string(use_diff=False))
    backbone_config["dtype"] = "float32"  # the weights memlm saves are float32
    kept = dataclasses.replace(
        config, backbone="hf", backbone_config=backbone_config, backbone_source=source,
        vocab_size=hf.vocab_size, n_layer=hf.num_hidden_layers,
        n_head=hf.num_attention_heads, d_model=hf.hidden_size)
    return model, kept


# ----- LoRA on the backbone (`trainable: lora`) -----------------------------------------------


def add_lora(backbone: Backbone, config: RecurrentConfig) -> list[nn.Parameter]:
    """Add LoRA adapters to the backbone's linear layers in place; return their parameters.

    Through peft's `inject_adapter_in_model`, so the model keeps its own class and module
    paths (ARMT's layer wrappers stay where they are). The adapters start as a zero update
    (peft's B = 0), so the wrapped model is unchanged at the moment they are added. The
    memory's own projections are never adapted. Targets default to peft's table for the
    HF model type (GPT-2: c_attn; Llama, Qwen2, Mistral: q_proj, v_proj) and are written
    into `config.lora_targets`, so a saved model rebuilds the same adapters. Calling it
    again on a model that has them returns the existing ones.
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    except ImportError as e:
        raise MissingDependencyError(
            "trainable: lora needs the peft package: pip install 'memlm[lora]' (or pip "
            "install peft).") from e
    model = backbone.model
    existing = [p for n, p in model.named_parameters() if ".lora_" in n]
    if existing:
        return existing
    targets = config.lora_targets
    if not targets:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        if not targets:
            raise ConfigError(
                f"trainable: lora has no default target modules for backbone "
                f"{model_type or type(model).__name__!r}; list the linear layers to adapt in "
                "model.lora_targets (e.g. [qkv, proj] for memlm's gpt).")
    conv1d = getattr(getattr(model, "config", None), "model_type", None) == "gpt2"
    has_memory = any(n.endswith(".memory") for n, _ in model.named_modules())  # ARMT's
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout, target_modules=list(targets),
                      fan_in_fan_out=conv1d,  # GPT-2's Conv1D stores weights transposed
                      exclude_modules=r".*\.memory(\..*)?" if has_memory else None)
    try:
        inject_adapter_in_model(lora, model)
    except ValueError as e:  # no module matched the targets
        first = (str(e).strip().splitlines() or ["no match"])[0]
        raise ConfigError(f"model.lora_targets {list(targets)} match no layer of the backbone: "
                          f"{first}") from e
    config.lora_targets = list(targets)
    return [p for n, p in model.named_parameters() if ".lora_" in n]


def make_adapter(model: nn.Module, config: RecurrentConfig) -> Backbone:
    if isinstance(model, MemLM):
        return MemlmBackbone(model)
    if hasattr(model, "get_input_embeddings") and hasattr(model, "base_model"):
        return HFBackbone(model, config.layers_attr)
    raise ConfigError(
        f"cannot wrap a {type(model).__name__}: pass a Hugging Face causal LM "
        "(PreTrainedModel) or build a memlm backbone with memlm.build(kind, backbone='gpt')."
    )


# ----- wrapping an existing Hugging Face model ----------------------------------------------

#: the registered memory wrappers `wrap()` accepts (their classes come from the registry)
KINDS = ("rmt", "armt")


def wrap(kind: str, model: nn.Module, **memory_config: Any) -> MemLM:
    """Wrap a Hugging Face causal LM in place as an RMT or ARMT.

        model = memlm.wrap("armt", AutoModelForCausalLM.from_pretrained("gpt2"),
                           segment_len=512, num_mem_tokens=10)

    `memory_config` takes any RMTConfig/ARMTConfig field (segment_len defaults to 512,
    context_len to segment_len). The HF config is stored in the wrapper's config, so
    `save_pretrained` / `MemLM.from_pretrained` round-trip without the hub.
    """
    if kind not in KINDS:
        raise ConfigError(f"wrap kind must be 'rmt' or 'armt', got {kind!r}.")
    if isinstance(model, MemLM):
        raise ConfigError(
            "memlm models are wrapped by building the wrapper: "
            f"memlm.build({kind!r}, backbone={model.config.arch!r}, ...)."
        )
    if not hasattr(model, "config") or not hasattr(model.config, "to_json_string"):
        raise ConfigError(f"wrap() expects a Hugging Face causal LM, got {type(model).__name__}.")
    from memlm.registry import ARCHITECTURES

    spec = ARCHITECTURES.get(kind)
    model_cls, config_cls = spec.model_cls, spec.config_cls
    hf = model.config
    segment_len = memory_config.pop("segment_len", 512)
    data = {
        "vocab_size": hf.vocab_size, "n_layer": hf.num_hidden_layers,
        "n_head": hf.num_attention_heads, "d_model": hf.hidden_size,
        "context_len": memory_config.pop("context_len", segment_len),
        "segment_len": segment_len,
        **memory_config,
        "arch": kind, "backbone": "hf",
        "backbone_config": json.loads(hf.to_json_string(use_diff=False)),
    }
    return model_cls(config_cls.from_dict(data, where=f"wrap({kind!r})"), backbone=model)
