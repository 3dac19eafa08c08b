"""Graph Memory Transformer (GMT): a pre-LN GPT whose every FFN is a graph-memory cell.

    model = memlm.build("gmt", vocab_size=97, n_layer=2, d_model=64, n_head=4)

The backbone is memlm's `Decoder` with two slot factories: bias-free causal
attention without residual dropout, and `GraphMemoryCell` in the FFN slot, so
the model has no dense MLP at all. Everything memory-specific lives in
`memlm/memory/graph_cell.py`; this file wires the cells into the model
interface:

* forward: tells every cell what this pass must do (aux losses when there are
  targets, diagnostics in eval, write-back statistics only in a
  gradient-enabled training forward) through a `GMTContext`;
* `on_train_step_end(step, max_steps)`: the trainer's generic hook, called after
  each optimizer step. It applies the accumulated write-back, runs maintenance
  every `maintenance_every` steps and sets the routing temperature for the next
  step. The trainer never needs to know it is training a GMT.
* `faithful=True` reproduces the reference implementation where memlm differs
  (docs/gmt.md#how-memlm-differs-from-the-reference-and-why): graph term added as a
  probability, routing in the autocast dtype, in-forward write-back toward the
  raw block output (in eval too), learnable write momentum, final-layer re-seed
  pool, Adam moments of reset rows kept.
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from memlm.config import ModelConfig, NonNegativeInt, PositiveFloat, UnitFloat, at_least
from memlm.errors import CheckpointError, ConfigError
from memlm.memory.graph_cell import (
    CellRun,
    GraphCellConfig,
    GraphMemoryCell,
    routing_temperature,
)
from memlm.models.base import ForwardContext, MemLM, ModelOutput
from memlm.models.decoder import Decoder
from memlm.nn.attention import CausalSelfAttention, KVCache
from memlm.registry import register_arch
from memlm.types import IGNORE_INDEX

#: edge-entropy target of the reference (4.0 nats at K = 128) as a fraction of ln K
EDGE_ENTROPY_FRACTION = 4.0 / math.log(128)

# Maintenance draws its random numbers (which re-seed rows a dead slot gets, the pool
# sample) from its own generators, seeded by (maintenance_seed, step, layer) alone and never
# from torch's global RNG. So training draws (dropout, data order) are the same with or
# without maintenance, a resumed run re-draws exactly what the uninterrupted run drew, and
# every rank draws alike. The three numbers are packed as mixed-radix digits,
#     seed_of(seed, step, layer) = (seed * STEP_RADIX + step) * LAYER_RADIX + layer,
# which gives every (seed, step, layer) its own generator as long as step < STEP_RADIX and
# layer < LAYER_RADIX. Only the sizes matter (any larger radix would do); the values are the
# first primes above 10^6 and 10^3. The per-cell pool sample (memory/graph_cell.py) mixes
# the layer in with the same LAYER_RADIX.
#: radix of the step digit: above any step count memlm trains for
STEP_RADIX = 1_000_003
#: radix of the layer digit: above any layer count
LAYER_RADIX = 1_009


@dataclass
class GMTConfig(ModelConfig):
    """GMT fields on top of the shared size vocabulary.

    Defaults and the reference's: docs/gmt.md#reference-defaults-and-training-recipe.

    `dropout` is the embedding dropout; attention dropout is `attn_dropout`
    (defaults to `dropout`); there is no residual dropout. `bias` applies to
    the LayerNorms; attention projections are bias-free unless `attn_bias`.
    """

    arch: str = "gmt"
    pos_emb: Literal["rope", "learned"] = "learned"
    attn_bias: bool = False
    attn_dropout: UnitFloat | None = None
    memory_slots: Annotated[int, at_least(2)] = 128
    nav_dim: Annotated[int, at_least(1)] = 128
    grav_eps: PositiveFloat = 0.01
    temp_max: float = 1.0
    temp_min: PositiveFloat = 0.1
    #: None -> 0.824 ln K, i.e. the reference's 4.0 nats at K = 128
    edge_entropy_target: float | None = None
    #: None -> K // 4
    cluster_target: int | None = None
    dead_threshold: float = 1e-3
    merge_threshold: float = 0.95
    centroid_cooldown: int = 100
    write_momentum: UnitFloat = 0.99
    usage_momentum: UnitFloat = 0.99
    #: optimizer steps between maintenance passes (0 disables maintenance)
    maintenance_every: NonNegativeInt = 110
    reseed_pool_size: int = 8192
    maintenance_seed: int = 0
    #: None -> "log" (memlm) or "prob" (faithful)
    graph_logits: Literal["log", "prob"] | None = None
    lambda_track: float = 1.0
    lambda_ortho: float = 0.05
    lambda_cluster: float = 0.3
    lambda_edge: float = 0.1
    lambda_contrast: float = 0.5
    faithful: bool = False
    #: faithful mode only: False evaluates a faithful model without mutating it
    eval_update_memory: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temp_min > self.temp_max:
            raise ConfigError(
                f"need 0 < temp_min <= temp_max, got temp_min={self.temp_min}, "
                f"temp_max={self.temp_max}.")

    def cell_config(self) -> GraphCellConfig:
        k = self.memory_slots
        edge_target = (EDGE_ENTROPY_FRACTION * math.log(k) if self.edge_entropy_target is None
                       else self.edge_entropy_target)
        return GraphCellConfig(
            d_model=self.d_model,
            n_slots=k,
            nav_dim=self.nav_dim,
            grav_eps=self.grav_eps,
            temp_init=self.temp_max,
            graph_logits=self.graph_logits or ("prob" if self.faithful else "log"),
            routing_fp32=not self.faithful,
            faithful=self.faithful,
            norm_eps=self.norm_eps,
            lambda_track=self.lambda_track,
            lambda_ortho=self.lambda_ortho,
            lambda_cluster=self.lambda_cluster,
            lambda_edge=self.lambda_edge,
            lambda_contrast=self.lambda_contrast,
            edge_entropy_target=edge_target,
            cluster_target=float(k // 4 if self.cluster_target is None else self.cluster_target),
            write_momentum=self.write_momentum,
            usage_momentum=self.usage_momentum,
            dead_threshold=self.dead_threshold,
            merge_threshold=self.merge_threshold,
            centroid_cooldown=self.centroid_cooldown,
            pool_size=self.reseed_pool_size,
        )


def gmt_attention(config: GMTConfig, layer_idx: int) -> nn.Module:
    """Causal SDPA attention as in the reference: bias-free, dropout inside attention only,
    no residual dropout, and no 1/sqrt(2L) scaling of the output projection's init."""
    p = config.dropout if config.attn_dropout is None else config.attn_dropout
    attn = CausalSelfAttention(config.d_model, config.n_head, config.attn_bias, p)
    attn.resid_dropout = nn.Identity()
    attn.proj.residual_proj = False
    return attn


class GMTContext(ForwardContext):
    """A ForwardContext that also carries what the cells must do in this pass."""

    def __init__(self, trace: bool, cell_run: CellRun):
        super().__init__(trace)
        self.cell_run = cell_run


@register_arch(
    "gmt", GMTConfig, "Graph Memory Transformer: every FFN replaced by a graph-memory cell "
    "(centroids, directed edges, gated displacement)",
    inspector="memlm.inspect.gmt:inspect_gmt",
    health="memlm.inspect.health:gmt_output_health",
    tiny=dict(memory_slots=128, nav_dim=64),
    cost=2.7,  # benchmarks/arch_cost.py
    window_only="its graph memory is learned slots inside each layer, read within the current "
                "window; no state passes from one window to the next",
)
class GMT(MemLM):
    config_class = GMTConfig

    def __init__(self, config: GMTConfig):
        super().__init__(config)
        cell_cfg = config.cell_config()
        self.decoder = Decoder(
            config,
            make_attn=gmt_attention,
            make_ffn=lambda cfg, i: GraphMemoryCell(cell_cfg, layer_idx=i),
        )
        # optimizer steps completed; decides when the next step ends with maintenance. The
        # buffer is saved with the weights; forward reads the Python-int mirror, because
        # reading a GPU buffer's value would wait for the device on every forward.
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self._steps_done = 0
        self._memory_frozen = False
        self._optimizer_ref: weakref.ref | None = None
        # data parallelism: in-place sum over ranks and copy from rank 0, handed over by the
        # trainer (attach_collectives); None in a single process
        self._reduce: Callable[[torch.Tensor], None] | None = None
        self._broadcast: Callable[[torch.Tensor], None] | None = None
        self._final_pool: torch.Tensor | None = None
        self.init_weights()
        for cell in self.cells:
            cell.reset_parameters()
        self.register_load_state_dict_post_hook(GMT._sync_step_counter)
        if config.faithful:  # the reference's AdamW decays every parameter (G5)
            for p in self.parameters():
                p.force_weight_decay = True

    @staticmethod
    def _sync_step_counter(module: GMT, incompatible_keys: Any) -> None:
        module._steps_done = int(module.steps_done)

    @property
    def cells(self) -> list[GraphMemoryCell]:
        return [block.ffn for block in self.decoder.blocks]

    def rank_local_buffers(self) -> list[str]:
        """The write-back statistics: each rank accumulates its own from its own batches, and
        `on_train_step_end` sums them, so DDP must not overwrite them with rank 0's."""
        return [f"decoder.blocks.{i}.ffn.{name}"
                for i in range(self.config.n_layer) for name in GraphMemoryCell.STAT_BUFFERS]

    def attach_collectives(self, reduce: Callable[[torch.Tensor], None],
                           broadcast: Callable[[torch.Tensor], None]) -> None:
        """Keep the memory identical on every rank (the trainer calls this under data
        parallelism; train/distributed.py provides the functions).

        The memory is updated outside autograd, so DDP's gradient averaging does not reach
        it: the write-back statistics are summed with `reduce` (in place) before they are
        applied, and after maintenance every rank takes rank 0's centroids, usage, ages and
        reset rows via `broadcast` (in place; re-seed pools differ between ranks).
        """
        self._reduce, self._broadcast = reduce, broadcast

    # ----- forward -------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        state: Any = None,
        trace: bool = False,
        cache: KVCache | None = None,
    ) -> ModelOutput:
        self.check_length(input_ids, cache)
        cfg = self.config
        training_step = self.training and torch.is_grad_enabled()
        maintenance_next = training_step and self._maintenance_next()
        run = CellRun(
            n_layer=cfg.n_layer,
            token_mask=None if targets is None else (targets != IGNORE_INDEX).reshape(-1).float(),
            compute_aux=targets is not None,
            metrics=not self.training,
            collect_stats=training_step and not cfg.faithful,
            collect_pool=maintenance_next and not cfg.faithful,
            faithful_update=cfg.faithful and not self._memory_frozen
            and (self.training or cfg.eval_update_memory),
            pool_seed=cfg.maintenance_seed * STEP_RADIX + self._steps_done + 1,
        )
        ctx = GMTContext(trace, run)
        dec = self.decoder
        x = dec.embed(input_ids, cache.length if cache is not None else 0)
        x = dec.run_blocks(x, ctx, cache, after_block=(
            (lambda i, h: self.cells[i].after_block(h, ctx)) if cfg.faithful else None))
        if maintenance_next and cfg.faithful:
            self._store_final_pool(x, run.token_mask)
        logits = dec.head(x)
        for name, total in run.metric_sums.items():
            ctx.add_metric(name, total / cfg.n_layer)
        if run.metrics and input_ids.shape[1] > 1:  # not on single-token decode steps
            self._add_memory_metrics(ctx)
        if trace:
            self._assemble_trace(ctx, run)
        return self.assemble_output(logits, targets, ctx)

    def make_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        return self.decoder.make_cache(batch_size, max_len, device, dtype)

    def _add_memory_metrics(self, ctx: ForwardContext) -> None:
        """Block means of the state diagnostics; per-block values: memory_diagnostics()."""
        diags = [cell.memory_diagnostic_tensors() for cell in self.cells]
        for key in ("n_eff", "dead", "gate", "edge_ent", "edge_max", "cos_sim"):
            ctx.add_metric(f"gmt_{key}", torch.stack([d[key] for d in diags]).mean())

    def _assemble_trace(self, ctx: ForwardContext, run: CellRun) -> None:
        """Stack the per-layer records: per-token [B, T, L(, K)], per-layer [L, K(, K)]."""
        layers = [run.traces[i] for i in range(self.config.n_layer)]
        for key in ("src_probs", "tgt_probs", "src_slot", "src_prob", "tgt_slot", "tgt_prob",
                    "disp_norm", "graph_influence"):
            ctx.add_trace(key, torch.stack([rec[key] for rec in layers], dim=2))
        ctx.add_trace("usage", torch.stack([rec["usage"] for rec in layers]))
        ctx.add_trace("edges", torch.stack([rec["edges"] for rec in layers]))
        ctx.add_trace("gate", torch.stack([torch.sigmoid(c.gate.detach()) for c in self.cells]))
        ctx.add_trace("temperature", self.cells[0].temp.detach().clone())

    @torch.no_grad()
    def _store_final_pool(self, h: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Faithful re-seed pool: unit final-layer outputs, shared by all blocks."""
        rows = F.normalize(h.reshape(-1, h.shape[-1]).float(), dim=-1)
        if mask is not None:
            rows = rows[mask > 0]
        size = self.config.reseed_pool_size
        if rows.shape[0] > size:
            g = torch.Generator(device=rows.device).manual_seed(self._steps_done + 1)
            rows = rows[torch.randperm(rows.shape[0], generator=g, device=rows.device)[:size]]
        self._final_pool = rows.clone()

    # ----- training-time memory maintenance -------------------------------------------
    def _maintenance_next(self) -> bool:
        every = self.config.maintenance_every
        return every > 0 and (self._steps_done + 1) % every == 0

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Let maintenance zero the Adam moments of re-seeded centroid rows.

        Step 3 of docs/gmt.md#maintenance. Kept as a weak reference: the model never owns
        the optimizer.
        """
        self._optimizer_ref = weakref.ref(optimizer)

    @torch.no_grad()
    def on_train_step_end(self, step: int, max_steps: int) -> None:
        """After optimizer step `step` (1-based): write-back, maintenance, temperature.

        Default mode applies the statistics accumulated by this step's training
        forwards (summed over ranks under data parallelism, so every rank makes the same
        update). Faithful mode already wrote back inside each forward.
        """
        cfg = self.config
        if not cfg.faithful:
            if self._reduce is not None:
                for cell in self.cells:
                    for name in GraphMemoryCell.STAT_BUFFERS:
                        self._reduce(getattr(cell, name))
            for cell in self.cells:
                cell.apply_writeback()
        if cfg.maintenance_every > 0 and step > 0 and step % cfg.maintenance_every == 0:
            self.run_maintenance(step)
        self._steps_done = int(step)
        self.steps_done.fill_(int(step))
        self.set_temperature(
            routing_temperature(step / max(max_steps, 1), cfg.temp_max, cfg.temp_min))

    @torch.no_grad()
    def run_maintenance(self, step: int) -> list[torch.Tensor]:
        """Dead reset + merge in every block; returns each block's reset-row mask."""
        cfg = self.config
        resets = []
        for cell in self.cells:
            # folded into [0, 2^63) so that any maintenance_seed is a valid torch seed
            seed = ((cfg.maintenance_seed * STEP_RADIX + step) * LAYER_RADIX
                    + cell.layer_idx) % (2**63)
            g = torch.Generator().manual_seed(seed)
            reset = cell.maintain(g, pool=self._final_pool if cfg.faithful else None)
            if self._broadcast is not None:
                reset = self._broadcast_cell(cell, reset)
            if not cfg.faithful:
                self._zero_adam_rows(cell.C, reset)
            resets.append(reset)
        self._final_pool = None
        return resets

    def _zero_adam_rows(self, param: torch.Tensor, rows: torch.Tensor) -> None:
        """Re-seeded rows start with fresh optimizer moments (the old ones belong to another
        centroid)."""
        opt = self._optimizer_ref() if self._optimizer_ref is not None else None
        if opt is None or not bool(rows.any()):
            return
        state = opt.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            moment = state.get(key)
            if torch.is_tensor(moment) and moment.shape == param.shape:
                moment[rows] = 0.0

    def _broadcast_cell(self, cell: GraphMemoryCell, reset: torch.Tensor) -> torch.Tensor:
        """Rank 0's maintenance wins: pools differ across ranks, the memory must not."""
        for tensor in (cell.C.data, cell.usage, cell.age):
            self._broadcast(tensor)
        flags = reset.to(torch.uint8)
        self._broadcast(flags)
        return flags.bool()

    # ----- user-facing helpers -------------------------------------------------------
    @torch.no_grad()
    def set_temperature(self, temperature: float) -> None:
        """Set the routing temperature tau of every block (evaluation override)."""
        if temperature <= 0:
            raise ConfigError(f"routing temperature must be > 0, got {temperature}.")
        for cell in self.cells:
            cell.temp.fill_(float(temperature))

    def memory_diagnostics(self) -> list[dict[str, float]]:
        """Per-block state diagnostics (n_eff, dead, cos_sim, gate, edge_ent, ...)."""
        return [cell.memory_diagnostics() for cell in self.cells]

    def frozen_memory(self) -> _FrozenMemory:
        """Context manager: faithful forwards inside it leave the memory untouched."""
        return _FrozenMemory(self)

    # ----- reference checkpoints -----------------------------------------------------
    @classmethod
    def from_reference_state_dict(
        cls, state_dict: dict[str, torch.Tensor], config: GMTConfig
    ) -> GMT:
        """A GMT holding the weights of a reference (GMT v7) state dict, loaded strictly.

        Published reference weights were trained with graph_logits "prob": build
        `config` with faithful=True to evaluate them as trained.
        """
        model = cls(config)
        converted = convert_reference_state_dict(state_dict, config)
        expected = model.state_dict()
        memlm_only = set(model.rank_local_buffers()) | {"steps_done"}
        if config.tie_embeddings:
            memlm_only.add("decoder.lm_head.weight")
        missing = [k for k in expected if k not in converted and k not in memlm_only]
        if missing:
            raise CheckpointError(
                f"the reference state dict lacks {missing[:6]} (after renaming); it is not a "
                f"GMT v7 checkpoint of this size (n_layer={config.n_layer}).")
        for key, value in converted.items():
            if value.shape != expected[key].shape:
                raise CheckpointError(
                    f"reference tensor for {key!r} has shape {tuple(value.shape)}, the model "
                    f"expects {tuple(expected[key].shape)}; build the config with the "
                    "checkpoint's sizes.")
        model.load_state_dict(converted, strict=False)
        return model


class _FrozenMemory:
    def __init__(self, model: GMT):
        self.model = model

    def __enter__(self) -> GMT:
        self.previous = self.model._memory_frozen
        self.model._memory_frozen = True
        return self.model

    def __exit__(self, *exc: Any) -> None:
        self.model._memory_frozen = self.previous


# reference name -> memlm name, inside block i (docs/gmt.md: the reference checkpoint import)
_REF_BLOCK_NAMES = {
    "ln1": "ln1",
    "ln2": "ln2",
    "attn.qkv": "attn.qkv",
    "attn.out_proj": "attn.proj",
    "cell.C": "ffn.C",
    "cell.E": "ffn.E",
    "cell.Q_proj": "ffn.q_proj",
    "cell.K_proj": "ffn.k_proj",
    "cell.gate": "ffn.gate",
    "cell.write_momentum": "ffn.write_momentum",
    "cell.norm_C": "ffn.norm_c",
    "cell.norm_disp": "ffn.norm_d",
    "cell.usage": "ffn.usage",
    "cell.centroid_age": "ffn.age",
}
#: reference buffers memlm computes instead of storing: checked, then dropped
_REF_DERIVED = ("cell.diag_mask",)
_REF_TOP_NAMES = {"embed": "decoder.wte", "pos_embed": "decoder.wpe", "norm_final": "decoder.ln_f"}


def _rename(name: str, table: dict[str, str]) -> str | None:
    for ref, ours in sorted(table.items(), key=lambda kv: -len(kv[0])):
        if name == ref or name.startswith(ref + "."):
            return ours + name[len(ref):]
    return None


def convert_reference_state_dict(
    state_dict: dict[str, torch.Tensor], config: GMTConfig
) -> dict[str, torch.Tensor]:
    """Rename a reference GMT v7 state dict to memlm's names; unknown keys raise.

    This is `ckpt["model"]` as the reference's trainer saves it (`raw.state_dict()`):
    - each cell's persistent `diag_mask` buffer (-inf on the diagonal) is checked
      and dropped, since memlm builds the same mask itself;
    - the model-level `temp` buffer is copied into every block;
    - `lm_head.weight` must equal `embed.weight` (the reference ties them) and is
      dropped: memlm ties it to the embedding.
    A bare `pos_embed` parameter ([1, T, d] or [T, d]) also becomes the position table.
    """
    out: dict[str, torch.Tensor] = {}
    state_dict = {k.removeprefix("_orig_mod.").removeprefix("module."): v
                  for k, v in state_dict.items()}
    for name, value in state_dict.items():
        block = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
        if block is not None and block.group(2) in _REF_DERIVED:
            k = config.memory_slots
            mask = torch.zeros(k, k).fill_diagonal_(float("-inf"))
            if value.shape != (k, k) or not torch.equal(value.float(), mask):
                raise CheckpointError(
                    f"reference buffer {name!r} is not the {k}x{k} diagonal mask GMT v7 "
                    "registers (-inf on the diagonal, 0 elsewhere); memlm cannot load it.")
            continue
        if block is not None:
            inner = _rename(block.group(2), _REF_BLOCK_NAMES)
            if inner is None:
                raise CheckpointError(f"unknown reference key {name!r}; expected one of "
                                      f"blocks.i.{{{', '.join(_REF_BLOCK_NAMES)}}}.")
            out[f"decoder.blocks.{block.group(1)}.{inner}"] = value
        elif name == "pos_embed":
            out["decoder.wpe.weight"] = value.reshape(-1, value.shape[-1])
        elif name == "temp":
            for i in range(config.n_layer):
                out[f"decoder.blocks.{i}.ffn.temp"] = value.reshape(())
        elif name == "lm_head.weight" and config.tie_embeddings:
            embed = state_dict.get("embed.weight")
            if embed is not None and not torch.equal(value, embed):
                raise CheckpointError(
                    "reference lm_head.weight differs from embed.weight, but GMT v7 ties "
                    "them; set tie_embeddings: false to load an untied head.")
            continue
        else:
            ours = _rename(name, _REF_TOP_NAMES)
            if ours is None:
                raise CheckpointError(
                    f"unknown reference key {name!r}; expected embed, pos_embed, norm_final, "
                    "temp, lm_head or blocks.i.*.")
            out[ours] = value
    return out
