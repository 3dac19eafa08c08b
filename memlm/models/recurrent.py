"""RMT and ARMT: segment-level recurrent memory around any causal LM.

Both wrappers cut a long input into segments of `segment_len` tokens and run an
*unmodified* backbone on one segment at a time, carrying a fixed-size memory state from
each segment to the next. Cost is linear in length and the state is constant-size, so a
model can stream millions of tokens.

* **RMT** (Bulatov et al. 2022): m learned memory vectors frame the segment,
  `[read | text | write]`; the backbone's final hidden states at the write positions become
  the next segment's read block. Only the embeddings, position ids and final hidden states
  of the backbone are used.
* **ARMT** (Rodkin et al. 2024): every backbone layer gets an associative memory (see
  `memlm/memory/associative.py`); m memory tokens are appended after the text,
  `[text | mem]`, and their per-layer outputs are written into the layer's memory.

The backbone is either a memlm architecture from the registry (`backbone: gpt`, built from
the shared size fields) or any Hugging Face causal LM (`memlm.wrap("armt", hf_model)`).
Both go through the same adapter interface (`Backbone`): embed, run on embeddings with
explicit positions, final norm, head, layer list.

What `context_len` means here: the wrapper accepts inputs of ANY length and segments them
internally. `segment_len` is the text window of one backbone call (the backbone itself sees
segment_len + memory tokens). `context_len` is only the default window the trainer and the
evaluator feed per call; it defaults to one segment, so the trainer runs one segment per
batch and carries `out.state` (the model is stateful), and `segment_len` defaults to it.

The state is passed explicitly (`RMTState`, `ARMTState`), float32, and never stored on a
module. Generation feeds the final segment without write slots and rolls over into a new
segment (committing the full one to memory) when it reaches segment_len tokens.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
from torch import nn

from memlm.config import ModelConfig, PositiveFloat, PositiveInt, UnitFloat, at_least
from memlm.errors import ConfigError
from memlm.models.backbones import (
    HFBackbone,
    MemlmBackbone,
    SegmentKV,
    add_lora,
    build_hf_backbone,
    build_memlm_backbone,
    load_pretrained,
    make_adapter,
    pretrained_source,
)
from memlm.models.base import ForwardContext, MemLM, ModelOutput
from memlm.models.streaming import segment_bounds
from memlm.types import IGNORE_INDEX, tree_where_rows

# ----- configs -----------------------------------------------------------------------------


@dataclass
class RecurrentConfig(ModelConfig):
    """Fields shared by RMT and ARMT (docs/recurrent.md#config-fields-both-kinds)."""

    #: text tokens per segment (None: context_len, i.e. one segment per training batch)
    segment_len: PositiveInt | None = None
    num_mem_tokens: PositiveInt = 16
    #: a memlm architecture name ("gpt", ...), "hf" for a Hugging Face causal LM built from
    #: backbone_config, or "hf:PATH_OR_NAME" for a pretrained one (docs/finetune.md)
    backbone: str = "gpt"
    #: extra config fields of a memlm backbone, or the full HF config dict when backbone="hf"
    backbone_config: dict[str, Any] = field(default_factory=dict)
    #: where a pretrained backbone came from (hf:PATH_OR_NAME); a record, never read back
    backbone_source: str | None = None
    #: dotted path of the decoder layer list (auto-detected when None, then recorded here)
    layers_attr: str | None = None
    #: "all" trains everything; "memory" trains only the memory parameters (backbone frozen);
    #: "lora": the memory plus LoRA adapters on the frozen backbone (needs peft: memlm[lora])
    trainable: Literal["all", "memory", "lora"] = "all"
    #: LoRA rank, scale and dropout (the originals' defaults: r 8, alpha 32, dropout 0.1)
    lora_r: PositiveInt = 8
    lora_alpha: PositiveFloat = 32.0
    lora_dropout: UnitFloat = 0.1
    #: backbone module names that get adapters (None: peft's default for the HF model type,
    #: recorded here once resolved)
    lora_targets: list[str] | None = None
    #: recompute each segment in the backward pass (memory and all) instead of keeping its
    #: activations: activation memory of one segment instead of all, about 1/3 more compute
    checkpoint_segments: bool = False
    #: sequence mode: back-propagate through the last k memory transitions (-1: all, 0: none)
    bptt_depth: Annotated[int, at_least(-1)] = -1
    segment_alignment: Literal["left", "right", "center"] = "left"
    #: return (and score) only the last segment's logits (BABILong answers sit at the end)
    output_only_last_segment: bool = False
    #: False: a call that starts a fresh sequence does not score its first segment
    loss_from_first_segment: bool = True
    #: each segment also attends to the previous segment's text keys/values (detached,
    #: memory tokens excluded; the ARMT code's `sliding_window=True`): carried in the
    #: state, so reading in pieces and generation see them too (docs/finetune.md)
    sliding_window: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.segment_len is None:
            self.segment_len = self.context_len
        if self.backbone in ("rmt", "armt"):
            raise ConfigError(f"backbone {self.backbone!r} is itself a memory wrapper; use 'gpt'.")


# ----- generation cache --------------------------------------------------------------------


class SegmentCache:
    """The open (not yet written) segment during generation: its tokens and its KV cache.

    The committed memory state travels outside, as `out.state`; when the open segment
    reaches segment_len tokens it is re-run with write slots, folded into the state, and
    the KV cache starts empty again (constant memory for arbitrarily long generations).
    """

    def __init__(self) -> None:
        self.kv: Any = None
        self.pending: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """Tokens in the open segment."""
        return 0 if self.pending is None else self.pending.shape[1]

    def reset(self) -> None:
        self.kv, self.pending = None, None


# ----- the shared wrapper ------------------------------------------------------------------


class RecurrentLM(MemLM):
    """Segment recurrence around a backbone; subclasses define the memory (RMT, ARMT).

    With `sliding_window` the state also holds the previous segment's text keys and values
    (`SegmentKV`, field `window` of RMTState/ARMTState; None before the first segment): the
    next segment runs with them as a prefix of its KV cache, so each of its tokens (memory
    tokens too) attends to the whole previous segment, then causally within its own. Its
    positions continue after the prefix (what transformers does given past keys).
    """

    is_stateful = True
    #: the generation cache rolls over by itself (`SegmentCache`): generation never resets it
    unbounded_cache = True
    config: RecurrentConfig

    def __init__(self, config: RecurrentConfig, backbone: nn.Module | None = None):
        # the model records what it resolved (layers_attr) in its own copy: the caller's
        # config (a run's run.yaml, compared on --resume) stays exactly as given
        config = copy.copy(config)
        if backbone is None and pretrained_source(config.backbone) is not None:
            backbone, config = load_pretrained(config)  # a copy: backbone hf + its HF config
        super().__init__(config)
        extra = self.extra_positions(config)
        if config.sliding_window:  # the previous segment's keys come first
            extra += config.segment_len
        if backbone is None:
            backbone = (build_hf_backbone(config) if config.backbone == "hf"
                        else build_memlm_backbone(config, extra))
        self.backbone = make_adapter(backbone, config)
        limit = self.backbone.max_positions() if isinstance(self.backbone, HFBackbone) else None
        if limit is not None and config.segment_len + extra > limit:
            raise ConfigError(
                f"segment_len L={config.segment_len} plus memory positions ({extra} for "
                f"num_mem_tokens m={config.num_mem_tokens}"
                f"{' and the sliding window' if config.sliding_window else ''}) exceeds the "
                f"backbone's n_positions={limit}; use a smaller segment_len or num_mem_tokens."
            )
        config.layers_attr = self.backbone.layers_path
        with torch.no_grad():
            self.embed_std = float(self.backbone.input_embeddings().weight.float().std())

    # --- what a subclass provides
    @staticmethod
    def extra_positions(config: RecurrentConfig) -> int:
        raise NotImplementedError

    def memory_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def _segment(self, ids, state, mask, ctx, stats):  # -> (logits, new state)
        raise NotImplementedError

    def _cached_open(self, state, kv, ctx) -> None:
        """Prepare a fresh KV cache for a new open segment (RMT runs its read block)."""

    def _cached_step(self, ids, state, kv, ctx) -> torch.Tensor:
        raise NotImplementedError

    # --- the interface
    @property
    def segment_len(self) -> int:
        return int(self.config.segment_len)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        state: Any = None,
        trace: bool = False,
        cache: SegmentCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Run any number of tokens segment by segment, starting from `state` (init if None).

        `attention_mask` [B, T] (1 real, 0 padding) marks padding; a row without a real token
        in a segment does not change its memory. With `cache` (generation) the tokens extend
        the open segment (see `SegmentCache`).
        """
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        self._check_runtime()
        b, t = input_ids.shape
        fresh = state is None
        if state is None:
            state = self.init_state(b, input_ids.device)
        ctx = ForwardContext(trace)
        stats: list[dict[str, torch.Tensor]] = []
        if cache is not None:
            logits, state = self._forward_cached(input_ids, state, cache, ctx, stats)
            return self._finish(logits, targets, ctx, state, stats)
        bounds = segment_bounds(t, self.segment_len, self.config.segment_alignment)
        n_seg, depth = len(bounds), self.config.bptt_depth
        keep_from = bounds[-1][0] if self.config.output_only_last_segment else 0
        parts = []
        for s, (a, e) in enumerate(bounds):
            mask = attention_mask[:, a:e] if attention_mask is not None else None
            logits_s, state = self._run_segment(input_ids[:, a:e], state, mask, ctx, stats)
            if depth >= 0 and s < n_seg - 1 - depth:
                state = self.detach_state(state)  # keep only the last `depth` transitions
            if a >= keep_from:
                parts.append(logits_s)
        logits = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if targets is not None:
            targets = targets[:, keep_from:]
            if not self.config.loss_from_first_segment and fresh and n_seg > 1 and keep_from == 0:
                targets = targets.clone()
                targets[:, : bounds[0][1]] = IGNORE_INDEX
        return self._finish(logits, targets, ctx, state, stats)

    def forward_segment(
        self,
        ids: torch.Tensor,
        state: Any,
        attention_mask: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        trace: bool = False,
    ) -> tuple[ModelOutput, Any]:
        """One segment (at most segment_len tokens): (output, new state)."""
        if ids.shape[1] > self.segment_len:
            raise ConfigError(
                f"forward_segment got {ids.shape[1]} tokens but segment_len is "
                f"{self.segment_len}; call forward() to segment longer inputs."
            )
        out = self(ids, targets=targets, state=state, trace=trace, attention_mask=attention_mask)
        return out, out.state

    def reset_state_rows(self, state: Any, mask: torch.Tensor) -> Any:
        """Re-initialise the rows where `mask` [B] is True (their stream starts anew).

        A sliding window is not re-initialised but hidden from those rows (its mask), so
        the batch keeps one window length; every row reset: the initial state itself.
        """
        if state is None or not bool(mask.any()):
            return state
        fresh = self.init_state(mask.shape[0], mask.device)
        if "window" not in getattr(state, "_fields", ()):  # a subclass's own state type
            return tree_where_rows(mask, fresh, state)
        window = state.window
        if window is not None and bool(mask.all()):
            return fresh
        # the memory fields (all but the last, `window`) row by row
        core = tree_where_rows(mask, tuple(fresh)[:-1], tuple(state)[:-1])
        if window is not None:
            if isinstance(self.backbone, MemlmBackbone):
                raise ConfigError(
                    "sliding_window with a memlm backbone cannot hide the previous segment "
                    "from some rows only (memlm attention has no key mask); reset every row "
                    "at once, or use a transformers backbone (backbone: hf:PATH).")
            hidden = window.mask & ~mask.to(window.mask.device, torch.bool)[:, None]
            window = window._replace(mask=hidden)
        return type(state)(*core, window)

    def forget_memory(self, state: Any, batch_size: int, device=None) -> Any:
        """The initial memory with `state`'s sliding window kept: what a reader's
        `reset_memory` control run starts each segment from (the window is attention
        context, like the segment's own tokens, not memory)."""
        fresh = self.init_state(batch_size, device)
        window = getattr(state, "window", None)
        return fresh if window is None else fresh._replace(window=window)

    def make_cache(self, batch_size: int, max_len: int = 0, device=None, dtype=None
                   ) -> SegmentCache:
        """A generation cache; its size is bounded by one segment whatever `max_len` says."""
        return SegmentCache()

    def set_trainable(self, which: Literal["all", "memory", "lora"]) -> None:
        """Select trainable parameters by identity: everything, the memory parameters only,
        or the memory plus LoRA adapters added to the backbone (`add_lora`)."""
        if which not in ("all", "memory", "lora"):
            raise ConfigError(f"trainable must be 'all', 'memory' or 'lora', got {which!r}.")
        adapters = add_lora(self.backbone, self.config) if which == "lora" else []
        memory = {id(p) for p in [*self.memory_parameters(), *adapters]}
        for p in self.parameters():
            p.requires_grad_(which == "all" or id(p) in memory)
        self.config.trainable = which

    def on_train_step_end(self, step: int, max_steps: int) -> None:
        """A memlm backbone with its own maintenance (e.g. GMT) still gets it."""
        if isinstance(self.backbone, MemlmBackbone):
            self.backbone.model.on_train_step_end(step, max_steps)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if isinstance(self.backbone, MemlmBackbone) and hasattr(self.backbone.model,
                                                                "attach_optimizer"):
            self.backbone.model.attach_optimizer(optimizer)

    def embedding_params(self) -> int:
        """Token embeddings plus a learned position table (memlm `wpe`, GPT-2 `wpe`)."""
        n = self.backbone.input_embeddings().weight.numel()
        root = (self.backbone.decoder if isinstance(self.backbone, MemlmBackbone)
                else getattr(self.backbone.model, "base_model", self.backbone.model))
        wpe = getattr(root, "wpe", None)
        return n + (wpe.weight.numel() if isinstance(wpe, nn.Embedding) else 0)

    def memory_config(self) -> dict[str, Any]:
        """The memory settings saved next to the weights (docs/recurrent.md#what-is-saved)."""
        keep = set(type(self.config).__dataclass_fields__)
        keep -= set(ModelConfig.__dataclass_fields__) | {"backbone_config"}
        cfg = self.config.to_dict()
        return {"kind": self.config.arch, **{k: cfg[k] for k in sorted(keep) if k in cfg}}

    def save_pretrained(self, path, **extra_config: Any) -> None:
        super().save_pretrained(path, memory_config=self.memory_config(), **extra_config)

    # --- internals
    def _run_backbone(self, x, mask, past: SegmentKV | None, text: tuple[int, int], ctx,
                      want_pre: bool = False):
        """One segment through the backbone: (pre-norm or None, post-norm, new window).

        `mask` [B, len(x)] or None marks x's padding; `text` = (start, end) of the text
        tokens within x, whose keys/values become the next segment's window (None without
        `sliding_window`). The past is detached already; this segment's own keys are
        detached for the next one (the original's truncation).
        """
        if not self.config.sliding_window:
            pre, post = self.backbone.run(x, mask, ctx=ctx, want_pre=want_pre)
            return pre, post, None
        b, n = x.shape[:2]
        cache = self.backbone.window_cache(b, x.device, past)
        full, shift = self._window_mask(past, mask, b, n, x.device)
        pre, post = self.backbone.run(x, full, cache=cache, ctx=ctx, want_pre=want_pre,
                                      shift=shift)
        t = 0 if past is None else past.length
        keys, values = self.backbone.cached_kv(cache, t + text[0], t + text[1])
        # memlm attention reads padding as text (no key mask), in the window as in x
        seen = (torch.ones(b, text[1] - text[0], dtype=torch.bool, device=x.device)
                if mask is None or isinstance(self.backbone, MemlmBackbone)
                else mask[:, text[0]:text[1]].to(torch.bool))
        window = SegmentKV(tuple(k.detach() for k in keys), tuple(v.detach() for v in values),
                           seen)
        return pre, post, window

    @staticmethod
    def _window_mask(past: SegmentKV | None, mask, b: int, n: int, device):
        """The attention mask over (window, then the n new tokens) and the per-row position
        shift; (mask, None) when nothing of the window is hidden (the fast causal path)."""
        if past is None or bool(past.mask.all()):
            if past is None or mask is None:
                return mask, None
            return torch.cat([past.mask.to(mask.dtype), mask], dim=1), None
        new = mask if mask is not None else torch.ones(b, n, dtype=torch.long, device=device)
        full = torch.cat([past.mask.to(new.dtype), new], dim=1)
        # a row that sees none of the window (reset) starts at position 0, as it would fresh
        shift = torch.where(past.mask.any(dim=1), 0, past.length).to(device)
        return full, shift

    def _cached_run(self, x, state, kv, ctx):
        """Generation inside the open segment: `x` extends the KV cache `kv`, which starts
        with the state's window when `sliding_window` is on."""
        past = getattr(state, "window", None) if self.config.sliding_window else None
        if past is None or bool(past.mask.all()):
            return self.backbone.run(x, cache=kv, ctx=ctx)
        held = self._kv_length(kv) - past.length  # open-segment tokens already cached
        ones = torch.ones(x.shape[0], held + x.shape[1], dtype=torch.long, device=x.device)
        full, shift = self._window_mask(past, ones, x.shape[0], 0, x.device)
        return self.backbone.run(x, full, cache=kv, ctx=ctx, shift=shift)

    @staticmethod
    def _kv_length(kv) -> int:
        return int(kv.get_seq_length() if hasattr(kv, "get_seq_length") else kv.length)

    def _run_segment(self, ids, state, mask, ctx, stats):
        """`_segment`, recomputed in backward when `checkpoint_segments` is on (training)."""
        if not (self.config.checkpoint_segments and self.training and torch.is_grad_enabled()):
            return self._segment(ids, state, mask, ctx, stats)
        from torch.utils.checkpoint import checkpoint

        # the recompute runs _segment again and would append its stats a second time
        # (after they were read); it gets a throwaway list and context instead
        first = [True]

        def run(ids, state, mask):
            live = first[0]
            first[0] = False
            return self._segment(ids, state, mask, ctx if live else ForwardContext(),
                                 stats if live else [])

        return checkpoint(run, ids, state, mask, use_reentrant=False)

    def _check_runtime(self) -> None:
        """Hook for checks that depend on how the backbone was set up after construction."""

    def _forward_cached(self, ids, state, cache: SegmentCache, ctx, stats):
        """Extend the open segment by `ids`; full segments are committed to memory."""
        L, t, pos, parts = self.segment_len, ids.shape[1], 0, []
        while pos < t:
            if cache.length == 0 and t - pos >= L:  # a whole segment: the ordinary path
                logits, state = self._segment(ids[:, pos : pos + L], state, None, ctx, stats)
                parts.append(logits)
                pos += L
                continue
            if cache.kv is None:
                cache.kv = (self.backbone.window_cache(ids.shape[0], ids.device, state.window)
                            if self.config.sliding_window
                            else self.backbone.new_kv_cache(ids.shape[0], ids.device))
                self._cached_open(state, cache.kv, ctx)
            chunk = ids[:, pos : pos + min(L - cache.length, t - pos)]
            parts.append(self._cached_step(chunk, state, cache.kv, ctx))
            cache.pending = chunk if cache.pending is None else torch.cat([cache.pending, chunk], 1)
            pos += chunk.shape[1]
            if cache.length == L:  # roll over: write the full segment, start an empty one
                _, state = self._segment(cache.pending, state, None, ctx, stats)
                cache.reset()
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)), state

    def _finish(self, logits, targets, ctx, state, stats) -> ModelOutput:
        for key in stats[0] if stats else ():
            ctx.add_metric(key, torch.stack([s[key] for s in stats]).mean())
        if ctx.trace_enabled and stats:
            ctx.add_trace("segment_stats", [{k: float(v) for k, v in s.items()} for s in stats])
        return self.assemble_output(logits, targets, ctx, state)

    def _row_mask(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        return None if mask is None else mask.to(torch.bool).any(dim=-1)


def _append_trace(ctx: ForwardContext, key: str, value: torch.Tensor, dim: int = 1) -> None:
    """Grow a per-segment trace entry by one segment (along `dim`) within one forward call."""
    prev = ctx.trace.get(key)
    ctx.add_trace(key, value if prev is None else torch.cat([prev, value], dim))
