"""How long a run trains: steps from a token budget, and `--steps` applied to a curriculum.

With a curriculum the trainer runs the stages' steps and ignores train.max_steps, so
every command that changes the length of a run (`memlm train --steps`, `memlm compare
--tokens/--steps`) goes through these functions to treat both kinds of config alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from memlm.errors import ConfigError
from memlm.specs import parse_count


def total_steps(train_cfg: Any) -> int:
    """Optimizer steps the config runs: the stages' sum with a curriculum, else max_steps."""
    return train_cfg.total_steps


def steps_with_curriculum(train_cfg: Any, steps: int) -> Any:
    """`train_cfg` set to run `steps` optimizer steps, a curriculum included.

    With a curriculum, `steps` cuts it to its first `steps` steps (stages past that are
    dropped), or lengthens its last stage when `steps` is more than the stages hold.
    Without one it sets max_steps.
    """
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}.")
    if not train_cfg.curriculum:
        return train_cfg.replace(max_steps=steps)
    stages, left = [], steps
    for stage in train_cfg.curriculum:
        if left == 0:
            break
        take = min(stage.steps, left)
        stages.append(dataclasses.replace(stage, steps=take))
        left -= take
    if left:
        stages[-1] = dataclasses.replace(stages[-1], steps=stages[-1].steps + left)
    return train_cfg.replace(max_steps=steps, curriculum=stages)


def budget_train_config(train_cfg: Any, seq_len: int, tokens: str | int | None = None,
                        steps: int | None = None, batch_size: int | None = None) -> Any:
    """A comparison run's TrainConfig: its length from a token budget or a step count.

    `tokens` ("5M") becomes steps of batch_size x grad_accum x seq_len tokens; `steps`
    wins over it. Unless the config sets them, validation runs five times per run and
    the model is saved once, at the end.
    """
    changes: dict[str, Any] = {"batch_size": batch_size} if batch_size else {}
    if tokens:
        per_step = (batch_size or train_cfg.batch_size) * train_cfg.grad_accum * seq_len
        changes["max_steps"] = max(1, parse_count(tokens) // per_step)
    if steps is not None:
        changes["max_steps"] = steps
    if "max_steps" in changes:  # a curriculum from --config is cut or lengthened to match
        train_cfg = steps_with_curriculum(train_cfg, changes.pop("max_steps"))
    n = total_steps(train_cfg)
    changes.setdefault("eval_every", max(n // 5, 1))
    changes.setdefault("save_every", n)
    return train_cfg.replace(**changes)
