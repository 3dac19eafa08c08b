"""AdamW with decay / no-decay parameter groups and warmup + decay schedules."""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from memlm.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices decay; biases, norm gains and 1-D parameters do not.

    A parameter can opt out explicitly with `param.no_weight_decay = True`
    (memory slots whose scale carries meaning, for instance), or opt in with
    `param.force_weight_decay = True` (faithful modes of originals that decay
    every parameter).
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if getattr(p, "force_weight_decay", False):
            decay.append(p)
        elif p.dim() < 2 or getattr(p, "no_weight_decay", False):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _can_fuse(model: nn.Module) -> bool:
    """Whether the single-kernel AdamW applies: plain fp tensors on CPU or CUDA.

    On CPU the default AdamW updates one tensor at a time with about ten small
    ops each; the fused kernel does the whole update in one pass and is ~6x
    faster on this repo's model sizes. It is the same AdamW update, rounded
    differently (results agree to ~1 ulp per step, not bit for bit). Sharded
    FSDP2 parameters (DTensor) keep the default path.
    """
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a build without torch.distributed
        DTensor = ()  # noqa: N806
    params = [p for p in model.parameters() if p.requires_grad]
    return bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point()
        and not isinstance(p, DTensor) for p in params
    )


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    kwargs = {"fused": True} if _can_fuse(model) else {}
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **kwargs
    )


def lr_at(step: int, cfg: TrainConfig, max_steps: int | None = None) -> float:
    """Learning rate at optimizer step `step` (0-based): linear warmup, then decay to min_lr."""
    max_steps = max_steps or cfg.max_steps
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(max_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    if cfg.schedule == "linear":
        coeff = 1.0 - progress
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


def stage_lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at `step` of a run, curriculum stages with their own `lr` included.

    A stage with `lr` holds it; the run's warmup + decay schedule counts only the steps of
    the stages without one, so it runs its full course over them. Without such stages this
    is `lr_at` over the whole run.
    """
    if not cfg.curriculum:
        return lr_at(step, cfg, cfg.max_steps)
    span = sum(st.steps for st in cfg.curriculum if st.lr is None)
    done = scheduled = 0
    for i, st in enumerate(cfg.curriculum):
        if step < done + st.steps or i == len(cfg.curriculum) - 1:
            if st.lr is not None:
                return st.lr
            return lr_at(scheduled + step - done, cfg, span)
        done += st.steps
        scheduled += st.steps if st.lr is None else 0
    raise AssertionError("unreachable: the last stage returns")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
