"""The language-model loss every architecture, auxiliary objective and evaluator shares."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memlm.types import IGNORE_INDEX


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions whose target is not IGNORE_INDEX (fp32)."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
    )
