"""The dense feed-forward sublayer of the baseline (GELU MLP, GPT-2 style).

The activation is the exact (erf) GELU, as in nanoGPT and torch's `nn.GELU()`,
not GPT-2's tanh approximation: on CPU the tanh form is the slow one (timed side
by side in benchmarks/cpu_kernels.py). The two curves differ by less than 1e-3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(d_model, hidden, bias=bias)
        self.proj = nn.Linear(hidden, d_model, bias=bias)
        self.proj.residual_proj = True  # scaled init, see models.base.init_weights
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))
