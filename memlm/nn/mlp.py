"""Feed-forward sublayers: the dense GELU MLP of the baseline, and TMT's alternatives.

The activation is the exact (erf) GELU, as in nanoGPT and torch's `nn.GELU()`,
not GPT-2's tanh approximation: on CPU the tanh form is the slow one (timed side
by side in benchmarks/cpu_kernels.py). The two curves differ by less than 1e-3,
which is still far above parity tolerance, so the dense MLP also offers the tanh
form (`activation="gelu_tanh"`, GPT-2's `gelu_new`) for importing GPT-2 weights.

Every FFN here states its multiply-accumulates per token (`macs_per_token`), so
an architecture that swaps one for another can show it kept the compute equal
(TMT's per-token MAC trace, tests/test_tmt.py counts them with torch's
FlopCounter). `dual_stream_width` and `swiglu_hidden` give the widths that match
a dense FFN of `ffn_mult` x d_model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: `activation` names -> the `approximate` argument of F.gelu
GELU_APPROX = {"gelu": "none", "gelu_tanh": "tanh"}


class MLP(nn.Module):
    """x -> proj(GELU(fc(x))): the dense FFN, `hidden` wide (GPT: 4 d_model)."""

    def __init__(self, d_model: int, hidden: int, bias: bool = True, dropout: float = 0.0,
                 activation: str = "gelu"):
        super().__init__()
        if activation not in GELU_APPROX:
            raise ValueError(f"activation={activation!r}; use one of {', '.join(GELU_APPROX)}")
        self.approximate = GELU_APPROX[activation]
        self.fc = nn.Linear(d_model, hidden, bias=bias)
        self.proj = nn.Linear(hidden, d_model, bias=bias)
        self.proj.residual_proj = True  # scaled init, see models.base.init_weights
        self.dropout = nn.Dropout(dropout)
        self.macs_per_token = 2 * d_model * hidden

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate=self.approximate)))


def dual_stream_width(d_model: int, ffn_mult: int, gate: str = "vector") -> int:
    """Stream width s at which `DualStreamFFN` costs the dense FFN's MACs.

    Two streams cost 4 D s, the gate D^2 ("vector") or D ("scalar"); the dense FFN
    costs 2 ffn_mult D^2. With ffn_mult 4 and a vector gate, s = 7D/4.
    """
    gate_macs = d_model * d_model if gate == "vector" else d_model
    return round((2 * ffn_mult * d_model * d_model - gate_macs) / (4 * d_model))


def swiglu_hidden(d_model: int, ffn_mult: int) -> int:
    """SwiGLU's hidden width at the dense FFN's MACs: three D x h matrices, h = 2 ffn_mult D / 3."""
    return round(2 * ffn_mult * d_model / 3)


class DualStreamFFN(nn.Module):
    """out = g * A(v) + (1 - g) * B(v), g = sigmoid(W_g v + b_g); A, B GELU MLPs of width s.

    With a D x D gate, 4 D s + D^2 = 8 D^2 gives s = 7D/4: the same MACs (and
    parameters within a fraction of a percent) as the 4D dense FFN. A scalar
    gate (1 x D) gives s ~ 2D. The original TMT used s = D/2, 0.38x the dense budget.
    """

    def __init__(self, d_model: int, stream_dim: int, gate: str = "vector", bias: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        self.a = MLP(d_model, stream_dim, bias, 0.0)
        self.b = MLP(d_model, stream_dim, bias, 0.0)
        self.gate = nn.Linear(d_model, d_model if gate == "vector" else 1, bias=True)
        self.dropout = nn.Dropout(dropout)
        self.macs_per_token = 4 * d_model * stream_dim + d_model * self.gate.out_features

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        g = torch.sigmoid(self.gate(x))
        return self.dropout(g * self.a(x) + (1 - g) * self.b(x))


class SwiGLUFFN(nn.Module):
    """SwiGLU: w_out(SiLU(a) * b) with [a, b] = w_in(x); at matched MACs hidden = 8D/3."""

    def __init__(self, d_model: int, hidden: int, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.w_in = nn.Linear(d_model, 2 * hidden, bias=bias)
        self.w_out = nn.Linear(hidden, d_model, bias=bias)
        self.w_out.residual_proj = True  # scaled init, see models.base.init_weights
        self.dropout = nn.Dropout(dropout)
        self.macs_per_token = 3 * d_model * hidden

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        a, b = self.w_in(x).chunk(2, dim=-1)
        return self.dropout(self.w_out(F.silu(a) * b))
