"""`MemlmForCausalLM`: every memlm architecture behind the transformers causal-LM API.

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
- **Generation is memlm's.** `generate()` and `pipeline("text-generation")`
  drive the same `Decoding` reader as memlm's own generator
  (memlm/models/generation.py), held in `MemlmCache` from step to step (as
  `cache`, transformers' current name). So greedy tokens agree with
  `model.generate` token for token, and a memory model (RMT, ARMT, DNC,
  TMT-xmem) reads the whole prompt and carries its memory across segments
  while generating, however long the prompt; stateless models see their last
  `context_len` tokens.
- **Memory models read long text.** A stateful model given more ids than one
  segment reads them through memlm's one segment loop (memlm/models/streaming.py),
  its memory carried, so lm-eval's `HFLM(max_length=...)` scores such a model
  exactly like memlm's adapter (`memlm.eval.zeroshot`).
- **Tokenizers convert** (memlm/hf/tokenization.py). `transformers_tokenizer(tok)` turns memlm's byte,
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
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from memlm.errors import CheckpointError, ConfigError, closest
from memlm.hf.configuration import MemlmConfig
from memlm.models.base import CONFIG_NAME, WEIGHTS_NAME, MemLM, ModelOutput
from memlm.models.generation import Decoding
from memlm.models.streaming import read, segment_length
from memlm.nn.loss import lm_loss
from memlm.types import IGNORE_INDEX


# ----- cache -------------------------------------------------------------------------------
class MemlmCache(Cache):
    """What `generate()` carries from step to step: memlm's incremental reader.

    transformers' own caches are filled layer by layer by transformers'
    attention modules. memlm's generation state is more than keys and values: the
    architecture's own KV cache, the memory state of a stateful model, and the
    tokens read so far, all held by `Decoding` (memlm/models/generation.py), the
    reader memlm's own `generate` uses. `position` is how many tokens of the
    sequence it has read, so `prepare_inputs_for_generation` knows which ids are new.

    A memlm cache fills left to right and cannot be cropped or reordered, so
    assisted decoding and cached beam search are refused with a clear error
    (beam search works with `use_cache=False`).
    """

    def __init__(self, reader: Decoding) -> None:
        super().__init__(layers=[])
        self.reader = reader

    @property
    def kv(self) -> Any:
        """The architecture's own KV cache inside the reader."""
        return self.reader.cache

    @property
    def state(self) -> Any:
        """The memory state after the tokens read so far (None: stateless)."""
        return self.reader.state

    @property
    def position(self) -> int:
        """Tokens of the sequence read so far."""
        return self.reader.length

    @property
    def length(self) -> int:
        """Tokens currently held in the KV cache."""
        return self.reader.cache.length

    # transformers' Cache interface -------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.reader.cache.length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.reader.window

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    def reset(self) -> None:
        """Forget everything read: the next call starts a new sequence from the initial state."""
        r = self.reader
        self.reader = Decoding(r.model, r.batch_size, r.device)

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

    def initialize_weights(self) -> None:
        """Skip transformers' initialisation pass over the whole module tree.

        Overriding `_init_weights` is not enough for RMT/ARMT around a transformers
        backbone: the pass hands every module inside that backbone (a `PreTrainedModel`)
        to the backbone's own `_init_weights`, which re-initialises whatever transformers
        did not create and flag, i.e. ARMT's memory projections and LoRA adapters, of a
        loaded checkpoint and of a model wrapped with `from_memlm` (weights shared) alike.
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
            no KV cache). Off by default: scoring calls need no cache. With a
            cache, logits come for the ids the model saw in this call (a stateless
            model's prompt is cut to its last `context_len` ids).
        memory_state: the state a stateful model starts from (default: its
            initial state, or the cache's state when continuing a cache).

        Without a cache, a stateful model given more than one segment of ids reads
        them through memlm's one segment loop, memory carried, as memlm's
        evaluators do. With a cache, the ids extend the sequence the cache has read
        (memlm's generation policy, `Decoding`).
        """
        _reject_left_padding(attention_mask)
        if cache is not None and not isinstance(cache, MemlmCache):
            raise ConfigError(
                f"cache must be a MemlmCache returned by this model, got "
                f"{type(cache).__name__}; memlm attention does not use transformers caches."
            )
        b = input_ids.shape[0]
        if cache is None and use_cache:
            cache = self.new_cache(b, input_ids.device, memory_state)
        targets = None
        if labels is not None:
            targets = torch.full_like(labels, IGNORE_INDEX)
            targets[:, :-1] = labels[:, 1:]
        if cache is None:
            if memory_state is None:
                memory_state = self.memlm.init_state(b, input_ids.device)
            out = self._run_or_stream(input_ids, targets, memory_state)
        else:
            if memory_state is not None and cache.position > 0:
                raise ConfigError("memory_state= starts a sequence; a cache continues one. "
                                  "Pass memory_state with a fresh cache (or none) only.")
            logits = cache.reader.feed(input_ids)
            out = ModelOutput(logits=logits, state=cache.state)
            if targets is not None:  # the positions the reader returned logits for
                out.lm_loss = out.loss = lm_loss(logits, targets[:, -logits.shape[1]:])
        result = MemlmCausalLMOutput(loss=out.loss, logits=out.logits, cache=cache,
                                     lm_loss=out.lm_loss, memory_state=out.state)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        return result if return_dict else result.to_tuple()

    def _run_or_stream(self, input_ids: torch.Tensor, targets: torch.Tensor | None,
                       state: Any) -> ModelOutput:
        """One memlm call; a stateful model reads a longer text segment by segment.

        Why: a memory model can read text longer than its window by carrying its
        state, and memlm's own evaluators (`MemlmLM`, `evaluate`) score such text
        through the one segment loop (`memlm.models.streaming`). Tools that only
        know the transformers API (lm-eval's HFLM with `max_length` above
        `context_len`) pass the whole text in one call; reading it here the same
        way gives them the scores memlm's adapter gives. Within one segment this
        is exactly `hf.memlm(ids)`. The loss of a longer call is the LM loss over
        all its tokens plus the mean of the segments' aux losses.
        """
        if not self.memlm.is_stateful or input_ids.shape[1] <= segment_length(self.memlm):
            return self.memlm(input_ids, targets=targets, state=state)
        out = read(self.memlm, input_ids, state)
        if targets is not None:
            out.lm_loss = lm_loss(out.logits, targets)
            out.loss = out.lm_loss + sum(out.aux_losses.values(),
                                         torch.zeros((), device=input_ids.device))
        return out

    def new_cache(self, batch_size: int, device: torch.device | str, memory_state: Any = None
                  ) -> MemlmCache | None:
        """A fresh reader for `batch_size` rows starting from `memory_state` (None: the
        initial state), or None when the architecture has no KV cache."""
        reader = Decoding(self.memlm, batch_size, device, state=memory_state)
        return MemlmCache(reader) if reader.cache is not None else None

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
        """Pick the ids to feed this step; what the model sees is memlm's policy.

        With a cache: the ids the cache has not read yet (the whole prompt, then one
        new id per step); the cache's reader (`Decoding`, memlm's own generator's)
        decides what the model sees, memory carried. Without one (use_cache=False, or
        an architecture with no KV cache): every step re-reads the sequence from the
        starting state, a stateless model its last `context_len` ids, as memlm's
        generator does. Other `kwargs` are transformers' bookkeeping
        (next_sequence_length, is_first_iteration, ...), which this makes unnecessary.
        """
        if inputs_embeds is not None:
            raise ConfigError("memlm models take input_ids only; pass input_ids to generate().")
        if attention_mask is not None and not bool((attention_mask == 1).all()):
            raise ConfigError(
                "memlm models read no attention mask, so padded prompts would be read as text; "
                "generate rows of different lengths one at a time (batch size 1)."
            )
        if cache is None and use_cache:
            cache = self.new_cache(input_ids.shape[0], input_ids.device, memory_state)
        if cache is None:
            window = input_ids if self.memlm.is_stateful else input_ids[:, -self.config.context_len:]
            return {"input_ids": window, "memory_state": memory_state}
        return {"input_ids": input_ids[:, cache.position:], "cache": cache, "use_cache": True}

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
        from memlm.io import load_weights

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
