"""Token-level language-model metrics, accumulated as sums so they can be merged.

Perplexity is exp(total NLL / total tokens) over every evaluated token, never
the mean of per-batch perplexities (which overweights bad batches). Positions
whose target is IGNORE_INDEX (padding, unscored context) are excluded from
every metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from memlm.types import IGNORE_INDEX

LN2 = math.log(2.0)


@dataclass
class TokenMetrics:
    """Running sums over scored tokens; `update` per batch, `compute` at the end."""

    n_tokens: int = 0
    nll: float = 0.0
    top1: int = 0
    top5: int = 0
    prob: float = 0.0
    rank: float = 0.0
    entropy: float = 0.0
    n_bytes: int = 0
    extra_sums: dict[str, float] = field(default_factory=dict)
    extra_counts: dict[str, int] = field(default_factory=dict)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        mask = targets != IGNORE_INDEX
        if not bool(mask.any()):
            return
        lg = logits[mask].float()  # [N, V]
        tg = targets[mask]
        logp = F.log_softmax(lg, dim=-1)
        tgt_logp = logp.gather(-1, tg[:, None]).squeeze(-1)
        self.n_tokens += int(tg.numel())
        self.nll += float(-tgt_logp.double().sum())
        # rank = number of tokens with a strictly higher logit (0 = top-1)
        tgt_logit = lg.gather(-1, tg[:, None])
        rank = (lg > tgt_logit).sum(-1)
        self.top1 += int((rank == 0).sum())
        self.top5 += int((rank < 5).sum())
        self.rank += float((rank + 1).double().sum())
        self.prob += float(tgt_logp.exp().double().sum())
        self.entropy += float(-(logp.exp() * logp).sum(-1).double().sum())

    def add_extra(self, name: str, value: float, count: int = 1) -> None:
        """Average a model-reported metric (weighted by `count`, e.g. tokens)."""
        self.extra_sums[name] = self.extra_sums.get(name, 0.0) + float(value) * count
        self.extra_counts[name] = self.extra_counts.get(name, 0) + count

    def compute(self) -> dict[str, float]:
        n = max(self.n_tokens, 1)
        nll = self.nll / n
        out = {
            "tokens": self.n_tokens,
            "nll": nll,
            "ppl": math.exp(min(nll, 700.0)),
            "bits_per_token": nll / LN2,
            "top1": self.top1 / n,
            "top5": self.top5 / n,
            "p_correct": self.prob / n,
            "mean_rank": self.rank / n,
            "entropy": self.entropy / n,
        }
        if self.n_bytes:
            out["bits_per_byte"] = self.nll / LN2 / self.n_bytes
        for name, total in self.extra_sums.items():
            out[name] = total / max(self.extra_counts[name], 1)
        return out
