"""The language-model loss every architecture, auxiliary objective and evaluator shares."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memlm.types import IGNORE_INDEX


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions whose target is not IGNORE_INDEX (fp32).

    A batch with no scored position gives 0 with a zero gradient, not NaN: with
    `data.score: answers` a segment without an answer is normal, and its loss must not
    poison the others (the trainer weights each segment by its scored count, here 0).
    The sum is divided on the device, so no host sync.
    """
    targets = targets.reshape(-1)
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets,
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)
