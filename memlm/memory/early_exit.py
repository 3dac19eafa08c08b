"""Adaptive depth with real compute skipping (CALM-style early exit).

The original TMT ran every layer for every token and then restored the
pre-layer state of "exited" tokens, so nothing was saved; its gate was trained
only to be far from 1/2, with no link to prediction quality. memlm follows
CALM (Schuster et al. 2022):

* Training: all layers run. The shared head (final norm + tied embedding)
  also scores two sampled exit-eligible layers, with weights proportional to
  their depth, so intermediate states become predictive. A small per-layer
  classifier reads the *detached* hidden state and is trained with BCE to
  predict whether that layer's argmax equals the final layer's, i.e. its
  training signal is the LM's own predictions and it cannot distort the LM.
* Inference: token t exits at the first eligible layer whose confidence
  reaches lambda, and its prediction is that layer's logits. An exited token
  issues no query and runs no FFN above its exit layer; its hidden state is
  frozen ("state propagation"), and deeper layers still compute its keys and
  values from that frozen state (2 D^2 MACs instead of ~12 D^2 + attention), so
  later tokens see exactly the keys a compute-all reference would give them.
* lambda starts unset (full depth) and is chosen by `calibrate_exit_threshold`:
  the smallest value on a grid whose early-vs-full argmax agreement on held-out
  data is at least 1 - eps.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memlm.errors import ConfigError, DataError
from memlm.nn.loss import lm_loss
from memlm.types import IGNORE_INDEX, evaluating


class ExitClassifier(nn.Module):
    """c = sigmoid(w . LN(sg h) + b), b starting at -2 (pessimistic: exit is rare at first).

    w and b are plain parameters, not an nn.Linear, so the model's global
    N(0, 0.02) init cannot reset the -2 bias (the original's re-init did).
    """

    def __init__(self, d_model: int, eps: float = 1e-5, init_bias: float = -2.0,
                 init_std: float = 0.02):
        super().__init__()
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.weight = nn.Parameter(torch.randn(d_model) * init_std)
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))

    def logit(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h.detach()) @ self.weight.to(h.dtype) + self.bias.to(h.dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit(h).float())


class CalmExits(nn.Module):
    """One classifier per exit-eligible layer (1-based layers min_layer .. L-1)."""

    def __init__(self, d_model: int, n_layer: int, min_layer: int, n_sampled: int,
                 eps: float = 1e-5):
        super().__init__()
        if not 1 <= min_layer:
            raise ConfigError(f"exit_min_layer must be >= 1, got {min_layer}.")
        self.n_layer = n_layer
        self.layers = list(range(min_layer, n_layer))
        self.n_sampled = n_sampled
        self.classifiers = nn.ModuleDict({str(layer): ExitClassifier(d_model, eps)
                                          for layer in self.layers})

    def eligible(self, layer: int) -> bool:
        return str(layer) in self.classifiers

    def confidence(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return self.classifiers[str(layer)](h)

    def sample_layers(self) -> list[int]:
        """The eligible layers scored by the head in this training step (torch RNG)."""
        n = min(self.n_sampled, len(self.layers))
        if n == len(self.layers):
            return list(self.layers)
        pick = torch.randperm(len(self.layers))[:n].sort().values
        return [self.layers[int(i)] for i in pick]

    def losses(
        self,
        hidden: dict[int, torch.Tensor],
        final_logits: torch.Tensor,
        head: Any,
        targets: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(early-layer CE weighted by l / L, mean confidence BCE) over the sampled layers.

        The final layer's CE is the model's `lm_loss`; adding sum_l (l/L) CE_l
        gives the CALM objective sum_l w_l CE_l / sum_l w_l up to a constant factor,
        while `lm_loss` (and so the reported perplexity) stays the honest CE of
        the final prediction.
        """
        scored = targets != IGNORE_INDEX
        final_top = final_logits.detach().argmax(-1)
        early = final_logits.new_zeros((), dtype=torch.float32)
        bce = final_logits.new_zeros((), dtype=torch.float32)
        for layer, h in hidden.items():
            z = head(h)
            early = early + (layer / self.n_layer) * lm_loss(z, targets)
            agree = (z.detach().argmax(-1) == final_top).float()
            logit = self.classifiers[str(layer)].logit(h).float()
            bce = bce + F.binary_cross_entropy_with_logits(logit[scored], agree[scored])
        return early, bce / max(len(hidden), 1)


def layer_macs(d_model: int, ffn_macs: int, n_anchors: int, window: int, topk: int,
               n_extra: int, pos: torch.Tensor, queried: torch.Tensor) -> torch.Tensor:
    """Analytic MACs one layer spends on each token (B, S), for the `macs` trace.

    A querying token pays Q/K/V/O (4 D^2), the FFN, exact selection over its
    eligible keys (pos - w + 1 of them, D MACs each) and the softmax-weighted sum
    over its M + w + k (+ extra) entries (2 D each); a token that exited earlier
    pays only its keys and values (2 D^2).
    """
    d = d_model
    eligible = (pos - window + 1).clamp(min=0).float()
    entries = n_anchors + torch.minimum(pos + 1, torch.tensor(window)).float() + \
        torch.minimum(eligible, torch.tensor(float(topk))) + n_extra
    full = 4 * d * d + ffn_macs + eligible * d + entries * 2 * d
    return torch.where(queried, full, torch.full_like(full, 2.0 * d * d))


@torch.no_grad()
def calibrate_exit_threshold(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    eps: float = 0.05,
    grid: Sequence[float] = (0.99, 0.97, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3),
    apply: bool = True,
) -> dict[str, Any]:
    """Pick the smallest lambda whose exits keep argmax agreement with full depth >= 1 - eps.

    Each candidate is evaluated by really running the exiting forward pass
    (frozen states and all), not by replaying full-depth confidences, because
    exits change the keys later tokens attend to. Returns a table of
    (lambda, agreement, mean layers run) and the chosen lambda (None when no
    grid value qualifies: the model then keeps running at full depth).
    """
    batches = [b for b in batches]
    old = model.config.exit_threshold
    rows = []
    with evaluating(model):
        try:
            model.config.exit_threshold = None
            full = [model(b).logits.argmax(-1) for b in batches]
            chosen = None
            for lam in sorted(grid, reverse=True):
                model.config.exit_threshold = float(lam)
                agree, total, layers = 0, 0, 0.0
                for b, ref in zip(batches, full):
                    out = model(b, trace=True)
                    agree += int((out.logits.argmax(-1) == ref).sum())
                    total += ref.numel()
                    layers += float(out.trace["exit_layer"].float().sum())
                row = {"lambda": float(lam), "agreement": agree / max(total, 1),
                       "mean_layers": layers / max(total, 1)}
                rows.append(row)
                if row["agreement"] >= 1 - eps:
                    chosen = float(lam)
        finally:
            model.config.exit_threshold = old
    if apply:
        model.config.exit_threshold = chosen
    return {"lambda": chosen, "eps": eps, "table": rows}


def calibrate_on_tokens(model: nn.Module, ids: Sequence[int], eps: float = 0.01,
                        windows: int = 64, where: str = "the model",
                        source: str = "the held-out text", batch_size: int = 8
                        ) -> dict[str, Any]:
    """`memlm calibrate`: `calibrate_exit_threshold` on held-out token ids, applied to `model`.

    The ids are cut into at most `windows` windows of the model's context length; the
    result adds `windows` and `window` to calibrate_exit_threshold's keys. `where` and
    `source` name the model and the text in errors (the run folder, the --data value).
    """
    if not hasattr(model.config, "exit_threshold"):
        raise ConfigError(f"{where} holds a {model.config.arch!r} model, which has no early "
                          "exit; calibrate applies to tmt models.")
    if not 0.0 < eps < 1.0:
        raise ConfigError(f"--eps is the argmax disagreement allowed, in (0, 1); got {eps}.")
    window = model.config.context_len
    n = min(len(ids) // window, windows)
    if n == 0:
        raise DataError(f"{source} holds {len(ids)} tokens, fewer than one "
                        f"{window}-token window; give more held-out text.")
    x = torch.tensor(list(ids[: n * window])).view(n, window)
    with torch.no_grad():
        result = calibrate_exit_threshold(model, list(x.split(batch_size)), eps=eps)
    return {**result, "windows": n, "window": window}


def format_calibration(result: dict[str, Any], n_layer: int) -> str:
    """The table `memlm calibrate` prints: agreement and depth per lambda, then the choice."""
    lines = [f"{result['windows']} windows of {result['window']} tokens; agreement with full "
             f"depth must be >= {1 - result['eps']}",
             "lambda | argmax agreement | mean layers run"]
    lines += [f"{row['lambda']:6.2f} | {row['agreement']:16.4f} | {row['mean_layers']:.2f}"
              f" of {n_layer}" for row in result["table"]]
    lines.append("no threshold keeps the agreement: the model keeps running at full depth"
                 if result["lambda"] is None else f"chosen lambda = {result['lambda']}")
    return "\n".join(lines)


class ThresholdExitGate(nn.Module):
    """The original TMT's ExitGate, reproduced for `tmt_faithful_leaky` only.

    c = sigmoid(w . h + b) on the raw residual stream after the FFN; a token
    whose c exceeds the threshold is marked exited, in training as in evaluation.
    The model then restores its state from *before* the layer (this layer's
    update included) for every exited token, but still runs every layer for it:
    nothing is saved. Its only training signal is `decisiveness_loss`, which
    pushes c away from 1/2 whatever the prediction quality.
    """

    def __init__(self, d_model: int):
        super().__init__()
        self.proj = nn.Linear(d_model, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.proj(h)).squeeze(-1)

    @staticmethod
    def decisiveness_loss(confidences: Sequence[torch.Tensor]) -> torch.Tensor:
        """The original's gate loss: mean over layers of -E|c - 1/2|."""
        if not confidences:
            raise ValueError("decisiveness_loss needs the confidences of at least one layer")
        loss = confidences[0].new_zeros(())
        for c in confidences:
            loss = loss + -(c - 0.5).abs().mean()
        return loss / len(confidences)
