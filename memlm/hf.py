"""transformers classes for every memlm architecture.

    import memlm                                   # registers model_type "memlm"
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("runs/gpt/checkpoints/step-0001000")
    out = model(ids, labels=ids)                   # CausalLMOutputWithPast (+ memory_state)
    new = model.generate(ids, max_new_tokens=50)   # same tokens as memlm's own generator

One config class (`MemlmConfig`, the memlm config fields with `arch` among them)
and one model class (`MemlmForCausalLM`, a thin wrapper around whatever the
architecture registry builds) serve every architecture, so an architecture
added to `memlm/models/` is a transformers model without any code here.

What the wrapper does, and why:
- **One folder format.** `save_pretrained` and `from_pretrained` go through
  memlm's own writer and strict safetensors loader (memlm/models/base.py), so a
  folder written by either API loads in both, weights are never pickled, tied
  weights and buffers computed in constructors (RoPE tables) come out right,
  and the weight names are memlm's own (no `memlm.` prefix on disk).
- **Labels follow transformers.** `labels` are the input ids; position t is
  scored on labels[t + 1] (the shift happens inside), -100 is ignored, and the
  loss is memlm's total (LM loss + the architecture's weighted aux losses;
  `lm_loss` alone is in the output).
- **Generation matches `memlm.generation.generate`.** memlm's attention fills
  its own preallocated KV cache, and stateful models thread a memory state from
  call to call; `MemlmCache` carries both through `generate()` as `cache`
  (transformers' current name; the deprecated `past_key_values` is not used).
  The prompt is cut to the last `context_len` tokens; when the cache is full it
  restarts on the latest window from a fresh state, and an architecture without
  a KV cache re-reads the window every step from the initial state: the same
  rules as memlm's generator, so greedy tokens agree. Segment-recurrent models
  (rmt, armt) read the whole prompt and never restart, as their own
  `generate` does: their cache rolls over segment by segment by itself.
- **Memory models read long text.** A stateful model given more ids than its
  `context_len` reads them piece by piece with its memory carried, the way
  memlm's own evaluators score long text, so lm-eval's `HFLM(max_length=...)`
  scores such a model exactly like memlm's adapter (`memlm.eval.zeroshot`).
- **Tokenizers convert.** `transformers_tokenizer(tok)` turns memlm's byte,
  char, gpt2 and bpe tokenizers into a `PreTrainedTokenizerFast` giving the
  same ids, which is what tools built on transformers (HFLM) need.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from memlm.config import ModelConfig
from memlm.errors import CheckpointError, ConfigError, SequenceTooLongError, closest
from memlm.models.base import (
    CONFIG_NAME,
    IGNORE_INDEX,
    WEIGHTS_NAME,
    MemLM,
    ModelOutput,
    lm_loss,
)
from memlm.registry import ARCHITECTURES

MODEL_TYPE = "memlm"


# ----- config ------------------------------------------------------------------------------
class MemlmConfig(PretrainedConfig):
    """A memlm `ModelConfig` (any architecture) seen as a transformers config.

    Every field of the architecture's config dataclass is an attribute
    (`config.arch`, `config.d_model`, the architecture's own fields); the usual
    transformers names (`hidden_size`, `num_hidden_layers`,
    `num_attention_heads`, `max_position_embeddings`) are aliases, which is
    what tools such as lm-eval read to find the context length. Values are
    checked by the memlm dataclass, so a bad one fails here with memlm's message.
    """

    model_type = MODEL_TYPE
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "context_len",
    }

    def __init__(self, arch: str = "gpt", **kwargs: Any) -> None:
        config_cls = ARCHITECTURES.get(arch).config_cls
        for alias, name in self.attribute_map.items():
            if alias in kwargs:
                kwargs[name] = kwargs.pop(alias)
        fields = {f.name for f in dataclasses.fields(config_cls)} - {"arch"}
        ours = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
        model_config = config_cls.from_dict({**ours, "arch": arch}, where=f"MemlmConfig({arch!r})")
        kwargs.pop("model_type", None)  # a class attribute; config.json repeats it
        super().__init__(**kwargs)
        for key, value in model_config.to_dict().items():
            setattr(self, key, value)

    @classmethod
    def from_memlm(cls, config: ModelConfig) -> MemlmConfig:
        return cls(**config.to_dict())

    def to_memlm(self) -> ModelConfig:
        """The memlm config dataclass these attributes describe (validated again)."""
        config_cls = ARCHITECTURES.get(self.arch).config_cls
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(config_cls)}
        return config_cls.from_dict(values, where="MemlmConfig")


# ----- cache -------------------------------------------------------------------------------
class MemlmCache(Cache):
    """What `generate()` carries from step to step: memlm's KV cache and memory state.

    transformers' own caches are filled layer by layer by transformers'
    attention modules. memlm's attention writes into its own preallocated
    cache, whose layout is the architecture's business, and a stateful model
    must also get back the memory state its previous call returned. This class
    holds both, plus `position`: how many tokens of the sequence have been
    consumed, so `prepare_inputs_for_generation` knows which ids are new.

    A memlm cache fills left to right and cannot be cropped or reordered, so
    assisted decoding and cached beam search are refused with a clear error
    (beam search works with `use_cache=False`).
    """

    def __init__(self, kv: Any, state: Any, max_len: int) -> None:
        super().__init__(layers=[])
        self.kv = kv
        self.state = state
        self.max_len = max_len
        self.position = 0

    @property
    def length(self) -> int:
        """Tokens currently held in the KV cache (at most `max_len`)."""
        return self.kv.length

    def restart(self, state: Any, position: int) -> None:
        """Empty the KV cache and continue from `state` at sequence `position`."""
        self.kv.reset()
        self.state = state
        self.position = position

    # transformers' Cache interface -------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv.length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_len

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    def reset(self) -> None:
        self.restart(None, 0)

    def crop(self, tokens_to_remove: int) -> None:
        raise ConfigError(
            "a memlm cache cannot be cropped (its memory state cannot be rolled back); "
            "assisted/speculative decoding is not supported for memlm models."
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ConfigError(
            "beam search cannot reorder a memlm cache; pass use_cache=False to generate() "
            "for beam search (each step then re-reads the window)."
        )

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise ConfigError("a memlm cache cannot be expanded; build it for the final batch size.")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise ConfigError("a memlm cache cannot drop rows; pass use_cache=False instead.")


# ----- outputs -----------------------------------------------------------------------------
@dataclass
class MemlmCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus what memlm models add.

    loss: LM loss + the architecture's weighted aux losses (what training minimises).
    lm_loss: the cross-entropy alone (what perplexity is computed from).
    memory_state: the memory to pass as `memory_state=` with the next segment
        (None for stateless architectures).
    """

    lm_loss: torch.FloatTensor | None = None
    memory_state: Any = None


# ----- model -------------------------------------------------------------------------------
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "token")
# what transformers' Auto classes and tools such as lm-eval pass along whatever the model;
# memlm's loader has no use for it (remote code, offloading and sharding do not apply).
# Any other loader option is accepted only when it asks for nothing (None or False).
_IGNORED_LOAD_KWARGS = ("_from_auto", "_from_pipeline", "trust_remote_code", "adapter_kwargs",
                        "code_revision", "low_cpu_mem_usage", "use_safetensors",
                        "offload_folder")


class MemlmForCausalLM(PreTrainedModel, GenerationMixin):
    """Any registered memlm architecture behind the transformers causal-LM API.

    `self.memlm` is the memlm model itself (its submodules, its forward). Build
    one from a config (`MemlmForCausalLM(MemlmConfig(arch="gpt", ...))`), wrap
    an existing model (`MemlmForCausalLM.from_memlm(model)`, weights shared),
    or load a saved folder with `from_pretrained` / `AutoModelForCausalLM`.
    """

    config_class = MemlmConfig
    base_model_prefix = "memlm"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    # the cache holds memory that cannot be rolled back: transformers then refuses
    # assisted decoding up front instead of producing wrong tokens
    _is_stateful = True

    def __init__(self, config: MemlmConfig, model: MemLM | None = None) -> None:
        super().__init__(config)
        if model is None:
            from memlm import build_from_config

            model = build_from_config(config.to_memlm())
        self.memlm = model
        self.post_init()

    @classmethod
    def from_memlm(cls, model: MemLM) -> MemlmForCausalLM:
        """Wrap an existing memlm model (no copy: both views share the weights)."""
        return cls(MemlmConfig.from_memlm(model.config), model=model)

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Leave the weights as memlm's constructors made them.

        transformers calls this on every submodule after `__init__` to apply its
        generic N(0, 0.02) init. memlm models initialise themselves when built
        (scaled residual projections, memory-specific inits), so the generic
        pass would overwrite that and is deliberately skipped.
        """

    # ----- forward ----------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: MemlmCache | None = None,
        use_cache: bool | None = None,
        memory_state: Any = None,
        return_dict: bool | None = None,
    ) -> MemlmCausalLMOutput | tuple:
        """Run the memlm model on `input_ids` [B, T].

        labels: [B, T] ids with transformers' convention: `labels = input_ids`
            (shifted inside), -100 where a position is not scored.
        attention_mask: only right padding is accepted (1s then 0s): the model is
            causal, so padding after the real tokens cannot change their logits;
            memlm models read no mask, so left padding would be read as text.
        cache / use_cache: a `MemlmCache` from an earlier call continues
            from it; `use_cache=True` starts one (None when the architecture has
            no KV cache). Off by default: scoring calls need no cache.
        memory_state: the state a stateful model starts from (default: its
            initial state, or the cache's state when continuing a cache).

        Without a cache, a stateful model given more than `context_len` ids
        that it cannot take in one call (dnc) reads them in
        `context_len` pieces with the memory carried, as memlm's evaluators do.
        """
        _reject_left_padding(attention_mask)
        if cache is not None and not isinstance(cache, MemlmCache):
            raise ConfigError(
                f"cache must be a MemlmCache returned by this model, got "
                f"{type(cache).__name__}; memlm attention does not use transformers caches."
            )
        b = input_ids.shape[0]
        if cache is None and use_cache:
            cache = self.new_cache(b, input_ids.device)
        if memory_state is None:
            memory_state = (cache.state if cache is not None and cache.state is not None
                            else self.memlm.init_state(b, input_ids.device))
        targets = None
        if labels is not None:
            targets = torch.full_like(labels, IGNORE_INDEX)
            targets[:, :-1] = labels[:, 1:]
        if cache is None:
            out = self._run_or_stream(input_ids, targets, memory_state)
        else:
            out = self.memlm(input_ids, targets=targets, state=memory_state, cache=cache.kv)
        if cache is not None:
            cache.state = out.state
            cache.position += input_ids.shape[1]
        result = MemlmCausalLMOutput(loss=out.loss, logits=out.logits, cache=cache,
                                     lm_loss=out.lm_loss, memory_state=out.state)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        return result if return_dict else result.to_tuple()

    def _run_or_stream(self, input_ids: torch.Tensor, targets: torch.Tensor | None,
                       state: Any) -> ModelOutput:
        """One memlm call; a stateful model that refuses the length gets it in pieces.

        Why: a memory model can read text longer than its `context_len` by
        carrying its state, and memlm's own evaluators (`MemlmLM`, `evaluate`)
        score such text that way. Tools that only know the transformers API
        (lm-eval's HFLM with `max_length` above `context_len`) pass the whole
        text in one call; streaming it here in `context_len` pieces, the state
        carried, gives them the scores memlm's adapter gives. Models that take
        any length themselves (rmt, armt segment internally) are called once, so
        `hf(ids)` stays `hf.memlm(ids)` whenever the latter works. The loss of a
        streamed call is the LM loss over all its tokens plus the mean of the
        pieces' aux losses.
        """
        try:
            return self.memlm(input_ids, targets=targets, state=state)
        except SequenceTooLongError:
            if not self.memlm.is_stateful:
                raise  # a stateless model has nothing to carry: the text must be cut
        n = self.config.context_len
        logits, aux = [], []
        for start in range(0, input_ids.shape[1], n):
            piece = self.memlm(input_ids[:, start : start + n], state=state)
            state = piece.state
            logits.append(piece.logits)
            aux.append(sum(piece.aux_losses.values(), torch.zeros((), device=input_ids.device)))
        out = ModelOutput(logits=torch.cat(logits, dim=1), state=state)
        if targets is not None:
            out.lm_loss = lm_loss(out.logits, targets)
            out.loss = out.lm_loss + torch.stack(aux).mean()
        return out

    def new_cache(self, batch_size: int, device: torch.device | str) -> MemlmCache | None:
        """An empty cache for `batch_size` rows (None if the architecture has no KV cache)."""
        n = self.config.context_len
        kv = self.memlm.make_cache(batch_size, n, device)
        if kv is None:
            return None
        return MemlmCache(kv, self.memlm.init_state(batch_size, device), n)

    # ----- generation -------------------------------------------------------------------
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not hand us a transformers DynamicCache: the cache is
        # made in prepare_inputs_for_generation, with the model's own layout
        return False

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: MemlmCache | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        memory_state: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Pick the ids to feed this step, following memlm's generator step for step.

        With a cache: the whole prompt (its last `context_len` ids) first, then
        only the new ids; when they no longer fit, the cache restarts on the
        latest `context_len` ids from a fresh memory state. Without one
        (use_cache=False, or an architecture with no KV cache): the latest
        `context_len` ids every step, from the same starting state. A
        segment-recurrent model (rmt, armt) is never cut: it reads the whole
        sequence, as `RecurrentLM.generate` does. Other `kwargs` are
        transformers' bookkeeping (next_sequence_length, is_first_iteration,
        ...), which these rules make unnecessary.
        """
        if inputs_embeds is not None:
            raise ConfigError("memlm models take input_ids only; pass input_ids to generate().")
        if attention_mask is not None and not bool((attention_mask == 1).all()):
            raise ConfigError(
                "memlm models read no attention mask, so padded prompts would be read as text; "
                "generate rows of different lengths one at a time (batch size 1)."
            )
        whole = self._reads_whole_sequence
        n = input_ids.shape[1] if whole else self.config.context_len
        total = input_ids.shape[1]
        if cache is None and use_cache:
            cache = self.new_cache(input_ids.shape[0], input_ids.device)
        if cache is None:
            return {"input_ids": input_ids[:, -n:], "memory_state": memory_state}
        new = total - cache.position
        if cache.position == 0:
            ids = input_ids[:, -n:]
            cache.position = total - ids.shape[1]
            if memory_state is not None:
                cache.state = memory_state
        elif not whole and cache.length + new > n:
            ids = input_ids[:, -n:]
            cache.restart(self.memlm.init_state(input_ids.shape[0], input_ids.device),
                          total - ids.shape[1])
        else:
            ids = input_ids[:, total - new:]
        return {"input_ids": ids, "cache": cache, "use_cache": True}

    @property
    def _reads_whole_sequence(self) -> bool:
        """True for segment-recurrent models, which take any length and generate from all of it.

        Their memlm `generate` never cuts the prompt to `context_len` (the memory
        carries what lies beyond a segment), so generate() here must not either.
        """
        from memlm.models.recurrent import RecurrentLM

        return isinstance(self.memlm, RecurrentLM)

    # ----- save / load ------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | Path,
        eval_results: dict[str, Any] | None = None,
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        safe_serialization: bool = True,
        max_shard_size: int | str | None = None,
        **kwargs: Any,
    ) -> None:
        """Write the memlm folder (config.json, model.safetensors, README.md card).

        The same writer as `MemLM.save_pretrained`, so `MemLM.from_pretrained`
        reads the result too. Weights always go to one safetensors file
        (`max_shard_size` is accepted for `push_to_hub` and has no effect).
        """
        if kwargs.get("push_to_hub"):
            raise ConfigError("save then call model.push_to_hub(repo_id), which uploads the folder.")
        unknown = sorted(k for k, v in kwargs.items() if v not in (None, False))
        if unknown:
            raise ConfigError(f"MemlmForCausalLM.save_pretrained does not support {unknown}.")
        if state_dict is not None:
            raise ConfigError("memlm saves the model's own weights; load the state dict into the "
                              "model (model.load_state_dict) and save without state_dict=.")
        if not safe_serialization:
            raise ConfigError("memlm writes safetensors only; drop safe_serialization=False.")
        if is_main_process:
            self.memlm.save_pretrained(save_directory, eval_results=eval_results)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *model_args: Any,
        config: MemlmConfig | None = None,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device_map: str | int | torch.device | dict | None = None,
        subfolder: str | None = None,
        **kwargs: Any,
    ) -> MemlmForCausalLM:
        """Load a folder written by either `save_pretrained` (or a Hub repo holding one).

        memlm's strict safetensors loader builds the model (no pickle, and a
        folder from another architecture or size fails with a clear message).
        Keyword arguments that are config fields (`dropout=0.0`) override the
        saved config; `dtype`/`torch_dtype` and a single-device `device_map`
        ("cpu", "cuda:0", "auto") are honoured. The model is returned in eval mode.
        """
        if model_args:
            raise ConfigError("MemlmForCausalLM.from_pretrained takes no positional model args.")
        hub = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
        folder = _resolve_folder(pretrained_model_name_or_path, subfolder, hub)
        if config is None:
            cfg_path = folder / CONFIG_NAME
            if not cfg_path.is_file():
                raise CheckpointError(f"{folder} holds no {CONFIG_NAME}; is it a memlm model folder?")
            config = MemlmConfig.from_dict(json.loads(cfg_path.read_text()))
        model_config = config.to_memlm()
        fields = {f.name for f in dataclasses.fields(model_config)}
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
        for key, value in kwargs.items():
            if key in _IGNORED_LOAD_KWARGS or value is None or value is False:
                continue
            if key == "attn_implementation" and value == "sdpa":
                continue  # memlm attention is SDPA already
            raise ConfigError(
                f"from_pretrained got {key}={value!r}, which memlm models do not support.{closest(key, fields)} "
                f"Config fields that can be overridden: {', '.join(sorted(fields))}."
            )
        if overrides:
            model_config = model_config.replace(**overrides)
        from memlm import build_from_config
        from memlm.train.checkpoint import load_weights

        inner = build_from_config(model_config)
        load_weights(inner, folder / WEIGHTS_NAME)
        for key, value in model_config.to_dict().items():
            setattr(config, key, value)
        config._name_or_path = str(pretrained_model_name_or_path)
        model = cls(config, model=inner)
        dtype = dtype if dtype is not None else torch_dtype
        if dtype is not None and dtype != "auto":
            model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        if device_map is not None:
            model.to(_single_device(device_map))
        model.eval()
        return model


def _reject_left_padding(attention_mask: torch.Tensor | None) -> None:
    """Accept masks of the form 1...1 0...0 per row (right padding) and nothing else."""
    if attention_mask is None:
        return
    mask = attention_mask.to(torch.bool)
    # a 1 after a 0 means padding before (or between) real tokens
    if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ConfigError(
            "memlm models read no attention mask, so left padding would be read as text; "
            "pad on the right (the model is causal, so right padding cannot change earlier "
            "logits) or run rows of different lengths separately."
        )


def _resolve_folder(name: str | Path, subfolder: str | None, hub: dict[str, Any]) -> Path:
    """A local folder as is; anything else is downloaded from the Hub first."""
    path = Path(name)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(repo_id=str(name), **hub))
        except Exception as e:  # hub errors come in many types (offline, 404, auth)
            raise CheckpointError(
                f"{name!r} is not a local folder and could not be fetched from the Hub ({e}); "
                "pass the folder written by save_pretrained."
            ) from e
    return path / subfolder if subfolder else path


def _single_device(device_map: str | int | torch.device | dict) -> torch.device:
    if isinstance(device_map, dict):
        if set(device_map) != {""}:  # {"": device} puts the whole model on one device
            raise ConfigError("memlm models load onto one device; pass device_map='cpu', "
                              "'cuda:0', 'auto' or {'': device}, not a per-module map.")
        device_map = device_map[""]
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    return torch.device(device_map)


def transformers_tokenizer(tokenizer: Any) -> Any:
    """A transformers `PreTrainedTokenizerFast` giving the ids of a memlm tokenizer.

    Tools built on transformers (lm-eval's HFLM, pipelines) take only
    transformers tokenizers. The converted tokenizer encodes every text to the
    ids memlm's encodes it to (`encode(text, add_special_tokens=False)`), and its
    `eos_token_id` (also its bos) is memlm's `eot_id`, which lm-eval uses as the
    prefix of an empty context just as memlm's adapter does. The conversion per
    tokenizer kind (byte, char, gpt2, bpe) is `memlm.data.tokenizer_export.tokenizers_backend`;
    the same tokenizer is saved as tokenizer.json + tokenizer_config.json with
    every checkpoint, so `AutoTokenizer.from_pretrained(folder)` gives it too.
    """
    from transformers import PreTrainedTokenizerFast

    from memlm.data.tokenizer_export import tokenizers_backend

    tok, eot, split_special = tokenizers_backend(tokenizer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eot, bos_token=eot,
                                   split_special_tokens=split_special)


def register_auto_classes() -> None:
    """Map model_type "memlm" to these classes in AutoConfig / AutoModelForCausalLM."""
    AutoConfig.register(MODEL_TYPE, MemlmConfig, exist_ok=True)
    AutoModelForCausalLM.register(MemlmConfig, MemlmForCausalLM, exist_ok=True)


register_auto_classes()

__all__ = [
    "MemlmCache",
    "MemlmCausalLMOutput",
    "MemlmConfig",
    "MemlmForCausalLM",
    "register_auto_classes",
    "transformers_tokenizer",
]
