"""The one interface every memlm model follows.

    out = model(input_ids, targets=None, state=None, trace=False, cache=None)

`ModelOutput` carries logits, the total loss (mean cross-entropy over
non-ignored targets plus the already weighted auxiliary losses), the aux losses
one by one for logging, the memory `state` to feed to the next segment, an
optional per-token `trace` for inspection, and scalar `metrics` (memory
diagnostics) that the trainer and evaluator log without knowing what they mean.

The trainer, evaluator, inspector, HF wrapper and `stream()` only ever talk to a
model through this module, so a new architecture plugs in by subclassing
`MemLM` and registering itself; nothing outside `models/` names it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memlm.config import ModelConfig, model_config_from_dict
from memlm.errors import CheckpointError, SequenceTooLongError
from memlm.nn.loss import lm_loss
from memlm.types import tree_detach

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass
class ModelOutput:
    """What every `MemLM.forward` returns. B = batch rows, T = tokens given, V = vocab_size.

    Fields:
        logits: (B, T, V), float in the parameters' dtype (bf16 under autocast). Row b,
            position t scores the token that follows input_ids[b, t]. RMT/ARMT with
            `output_only_last_segment` return only the last segment's positions, (B, T_last, V).
        loss: 0-d float32, None without `targets`. What the trainer back-propagates:
            `lm_loss` plus every entry of `aux_losses` (already weighted).
        lm_loss: 0-d float32, None without `targets`. Mean next-token cross-entropy
            (nats) over the positions whose target is not IGNORE_INDEX (`lm_loss()` below).
        aux_losses: name -> 0-d tensor, each already multiplied by its config weight
            ("gmt_track", "dnc_entropy", "exit_conf_bce", ...); empty for GPT. Split out
            only so they can be logged one by one; `loss` already includes them.
        state: the memory after these tokens, to pass as `state=` with the next segment
            of the same rows: None for stateless models (GPT, GMT, TMT without xmem),
            otherwise the architecture's own structure of tensors with a batch axis
            (RMTState, ARMTState, DNCState, TMT-xmem's {"slots", "written"} dict). Still
            attached to the graph; `detach_state` truncates back-propagation.
        trace: None unless `trace=True`; then name -> detached per-token tensors or plain
            values for the inspectors (keys differ per architecture, e.g. DNC's
            "write_gate", TMT's "exit_layer"). Never used by training.
        metrics: name -> 0-d detached float32 memory diagnostics (e.g. "gmt_*", "rmt_*",
            "exit_*"; RMT/ARMT average them over segments). The trainer and evaluators
            log them as they come; their meaning is the model's, not the trainer's.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    state: Any = None
    trace: dict[str, Any] | None = None
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class ForwardContext:
    """Collects what sublayers contribute during one forward pass.

    Sublayers (a graph-memory cell, a DNC head, an exit gate) call `add_aux`,
    `add_metric` and `add_trace` instead of returning tuples, so the decoder's
    block loop stays the same for every architecture.
    """

    def __init__(self, trace: bool = False):
        self.trace_enabled = trace
        self.aux: dict[str, torch.Tensor] = {}
        self.metrics: dict[str, torch.Tensor] = {}
        self.trace: dict[str, Any] = {}

    def add_aux(self, name: str, value: torch.Tensor) -> None:
        """Add an already weighted aux loss (summed over layers under one name)."""
        self.aux[name] = self.aux[name] + value if name in self.aux else value

    def add_metric(self, name: str, value: torch.Tensor | float) -> None:
        self.metrics[name] = torch.as_tensor(value).detach().float()

    def add_trace(self, name: str, value: Any) -> None:
        if self.trace_enabled:
            self.trace[name] = value.detach() if torch.is_tensor(value) else value


class MemLM(nn.Module):
    """Base class: loss assembly, init, parameter counts, save/load, generation."""

    config_class: type[ModelConfig] = ModelConfig
    #: True when the model carries `state` from segment to segment; the trainer
    #: then feeds consecutive segments of one stream (truncated BPTT).
    is_stateful: bool = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config

    # ----- the interface ---------------------------------------------------------------
    def forward(  # pragma: no cover - abstract
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        state: Any = None,
        trace: bool = False,
        cache: Any = None,
    ) -> ModelOutput:
        raise NotImplementedError

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> Any:
        """Memory at the start of a stream (None for stateless models)."""
        return None

    def detach_state(self, state: Any) -> Any:
        """Cut the gradient through `state` (truncated BPTT)."""
        return tree_detach(state)

    def reset_state_rows(self, state: Any, mask: torch.Tensor) -> Any:
        """Re-initialise the state of rows where `mask` [B] is True (a new stream starts).

        The default resets everything when every row restarts; stateful models
        whose rows can restart independently override this.
        """
        if state is None or not bool(mask.any()):
            return state
        if bool(mask.all()):
            return self.init_state(mask.shape[0], mask.device)
        raise NotImplementedError(f"{type(self).__name__} cannot reset single state rows")

    def make_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> Any:
        """A KV cache for incremental decoding, or None if the model has none."""
        return None

    def on_train_step_end(self, step: int, max_steps: int) -> None:
        """Called by the trainer after each optimizer step (memory maintenance)."""

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Called by the trainer once its optimizer exists.

        Maintenance that re-seeds memory rows in `on_train_step_end` (GMT) uses it
        to zero those rows' optimizer moments; the default ignores it.
        """

    def attach_collectives(self, reduce: Callable[[torch.Tensor], None],
                           broadcast: Callable[[torch.Tensor], None]) -> None:
        """Called by the trainer under data parallelism (train/distributed.py).

        `reduce(t)` sums t over ranks in place, `broadcast(t)` copies rank 0's t in place.
        A model whose state changes outside autograd (GMT's memory maintenance) uses them
        to stay identical on every rank, so the model itself never calls torch.distributed.
        The default ignores them.
        """

    def rank_local_buffers(self) -> list[str]:
        """Buffer names (relative to this model) each rank keeps for itself: DDP must not
        overwrite them with rank 0's copy (GMT's write-back statistics). Default: none."""
        return []

    # ----- helpers for subclasses -------------------------------------------------------
    def check_length(self, input_ids: torch.Tensor, cache: Any = None) -> None:
        t = input_ids.shape[1] + (cache.length if cache is not None else 0)
        if t > self.config.context_len:
            raise SequenceTooLongError(
                f"sequence of {t} tokens is longer than the model's context_len="
                f"{self.config.context_len}; cut it (or use sliding-window eval / model.stream) "
                "or build the model with a larger context_len."
            )
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")

    def assemble_output(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor | None,
        ctx: ForwardContext,
        state: Any = None,
    ) -> ModelOutput:
        out = ModelOutput(
            logits=logits,
            aux_losses=ctx.aux,
            state=state,
            trace=ctx.trace if ctx.trace_enabled else None,
            metrics=ctx.metrics,
        )
        if targets is not None:
            out.lm_loss = lm_loss(logits, targets)
            out.loss = out.lm_loss + sum(ctx.aux.values(), torch.zeros((), device=logits.device))
        return out

    def init_weights(self) -> None:
        """GPT-2 init: N(0, init_std); residual projections scaled by 1/sqrt(2 n_layer)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                s = std / math.sqrt(2 * self.config.n_layer) if getattr(
                    module, "residual_proj", False) else std
                nn.init.normal_(module.weight, mean=0.0, std=s)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)

    def embedding_params(self) -> int:
        """Parameters of token (and learned position) embeddings; override if needed."""
        n = 0
        for name, p in self.named_parameters():
            if name.endswith(("wte.weight", "wpe.weight")):
                n += p.numel()
        return n

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (tied weights counted once), optionally without embeddings."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embedding_params() if non_embedding else n

    # ----- save / load ------------------------------------------------------------------
    def save_pretrained(
        self,
        path: str | Path,
        eval_results: dict[str, Any] | None = None,
        **extra_config: Any,
    ) -> None:
        """Write config.json + model.safetensors + a README.md model card (atomically).

        The folder is also a transformers checkpoint: config.json names
        `model_type: "memlm"`, which `import memlm` registers with
        `AutoConfig`/`AutoModelForCausalLM` (memlm/hf/), so both
        `MemLM.from_pretrained(path)` and `AutoModelForCausalLM.from_pretrained(path)`
        read it. `eval_results` go into the card (the trainer passes its run's latest
        validation record; memlm/model_card.py).
        """
        from memlm.hf_files import AUTO_MAP, write_remote_code
        from memlm.io import atomic_write_json, save_weights
        from memlm.model_card import write_model_card

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_weights(self, path / WEIGHTS_NAME)
        cfg = {
            "model_type": "memlm",
            "architectures": ["MemlmForCausalLM"],
            "memlm_version": _version(),
            **self.config.to_dict(),
        }
        cfg.update(extra_config)
        cfg["auto_map"] = AUTO_MAP  # stock tools, trust_remote_code=True: memlm/hf_files.py
        atomic_write_json(path / CONFIG_NAME, cfg)
        write_remote_code(path)
        write_model_card(self, path, eval_results)

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str = "cpu") -> MemLM:
        """Load any memlm model saved with `save_pretrained` (the class comes from config)."""
        from memlm.io import load_weights

        path = Path(path)
        cfg_path = path / CONFIG_NAME
        if not cfg_path.exists():
            raise CheckpointError(f"{path} holds no {CONFIG_NAME}; is it a memlm model folder?")
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); the file is corrupt.") from e
        config = config_from_saved(raw)
        from memlm.registry import ARCHITECTURES

        model = ARCHITECTURES.get(config.arch).model_cls(config)
        load_weights(model, path / WEIGHTS_NAME, map_location=map_location)
        return model

    # ----- reading and generating -------------------------------------------------------
    #: True when the model's generation cache never fills (it rolls over segment by
    #: segment by itself, RecurrentLM): `generate` then feeds it every token and never
    #: restarts it. Otherwise the cache holds one window (see memlm/generation.py).
    unbounded_cache: bool = False

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
        """Extend `input_ids` by up to `max_new_tokens` tokens (see `memlm.generation.generate`)."""
        from memlm.models.generation import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    def stream(self, tokens: Any, segment_len: int | None = None, **kwargs: Any):
        """Score a token stream of any length segment by segment, in constant memory.

        `tokens`: a 1-D id array/tensor or an iterable of id chunks (files: use
        `memlm.eval.stream`). Yields one `StreamStep` per segment; segments are cut by the
        model's own rule and stateful models carry their state (memlm/models/streaming.py).
        """
        from memlm.models.streaming import stream

        return stream(self, tokens, segment_len, **kwargs)


def config_from_saved(raw: dict[str, Any]) -> ModelConfig:
    """Rebuild a ModelConfig from a saved config.json.

    Keys that are not fields of the architecture's config are bookkeeping and
    are ignored: memlm's own (`memlm_version`) and those transformers adds when
    it writes the config (`architectures`, `transformers_version`, `dtype`, ...).
    """
    from memlm.registry import ARCHITECTURES

    arch = raw.get("arch", "gpt")
    fields = set(ARCHITECTURES.get(arch).config_cls.__dataclass_fields__)
    return model_config_from_dict({k: v for k, v in raw.items() if k in fields})


def _version() -> str:
    from memlm import __version__

    return __version__
