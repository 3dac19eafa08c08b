"""Memory anchors: persistent learned K/V slots, and optional per-row cross-segment slots.

The original TMT kept M "anchor" vectors that every training forward pass
moved 10% toward one batch-and-sequence mean (so all anchors collapsed onto the
same vector, rows of the batch leaked into each other, and evaluation wrote
nothing). memlm splits the idea into two sound parts:

* `PersistentAnchors` (all-attention persistent memory): per layer, learned
  keys P^K and values P^V (H, M, d) that sit in every query's softmax. They are
  ordinary parameters trained by the LM loss; nothing writes them in forward,
  they are excluded from weight decay, and they are the same for every row, so
  they are causal and batch-independent by construction.
* EMA value slots (`xmem_mode="ema_slots"`): each anchor m also owns a value
  slot U[b, h, m] *per batch row*, written only after a segment, from that
  segment, and read by later segments of the same row as one extra entry with
  key P^K[h, m]. Each slot is updated through its own key, so slots cannot all
  collapse onto one mean, and no row ever reads another row's slots.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class PersistentAnchors(nn.Module):
    """Learned anchor keys and values (H, M, d), read by every query of a layer."""

    def __init__(self, n_head: int, n_anchors: int, head_dim: int, init_std: float = 0.02):
        super().__init__()
        self.keys = nn.Parameter(torch.randn(n_head, n_anchors, head_dim) * init_std)
        self.values = nn.Parameter(torch.randn(n_head, n_anchors, head_dim) * init_std)
        for p in (self.keys, self.values):
            p.no_weight_decay = True  # read by memlm.train.optim.param_groups

    @property
    def n_anchors(self) -> int:
        return self.keys.shape[1]

    def max_pairwise_cosine(self) -> float:
        """Largest cosine between two anchor keys of one head (collapse shows as ~1.0)."""
        k = torch.nn.functional.normalize(self.keys.detach().float(), dim=-1)
        sim = k @ k.transpose(1, 2)
        m = k.shape[1]
        off = ~torch.eye(m, dtype=torch.bool, device=k.device)
        return float(sim[:, off].max()) if m > 1 else 0.0


# ----- per-row EMA slots (cross-segment memory) ------------------------------------------------


def init_slot_state(n_layer: int, batch_size: int, n_head: int, n_anchors: int, head_dim: int,
                    device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Empty slots: values (L, B, H, M, d) at zero and `written` (B,) False (masked until written)."""
    return {
        "slots": torch.zeros(n_layer, batch_size, n_head, n_anchors, head_dim, device=device,
                             dtype=dtype),
        "written": torch.zeros(batch_size, dtype=torch.bool, device=device),
    }


def reset_slot_rows(state: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Clear the rows where `mask` (B,) is True (a new stream or document starts there)."""
    keep = (~mask).to(state["slots"].dtype)[None, :, None, None, None]
    return {"slots": state["slots"] * keep, "written": state["written"] & ~mask}


@torch.no_grad()
def write_slots(
    state: dict[str, torch.Tensor],
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    anchor_keys: list[torch.Tensor],
    current_doc: torch.Tensor,
    continues: torch.Tensor,
    beta: float,
) -> dict[str, Any]:
    """Fold one finished segment into the slots of every layer.

    keys/values: per layer (B, H, T, d) of the segment; anchor_keys: per layer
    P^K (H, M, d); current_doc (B, T) marks the segment's tokens that belong to
    the document still open at its end (only those are written); continues (B,)
    is True where that document already owned the slots before this segment
    (no separator inside it), in which case U <- beta U + (1 - beta) u, else U <- u.
    A row whose segment ends exactly at a separator has no open document: its
    slots are cleared.
    """
    slots = state["slots"]
    has_doc = current_doc.any(dim=1)
    blend = (continues & state["written"])[:, None, None, None]
    new = []
    for layer, (k, v, pk) in enumerate(zip(keys, values, anchor_keys)):
        d = k.shape[-1]
        score = torch.einsum("hmd,bhtd->bhmt", pk.to(k.dtype), k) / math.sqrt(d)
        score = score.float().masked_fill(~current_doc[:, None, None, :], float("-inf"))
        alpha = score.softmax(-1).nan_to_num(0.0)  # rows without an open document -> 0
        u = torch.einsum("bhmt,bhtd->bhmd", alpha.to(v.dtype), v).to(slots.dtype)
        old = slots[layer]
        upd = torch.where(blend, beta * old + (1 - beta) * u, u)
        new.append(upd * has_doc.to(upd.dtype)[:, None, None, None])
    return {"slots": torch.stack(new), "written": has_doc}


# ----- the original's anchor sublayer (faithful TMT only) ----------------------------------------


class AnchorCrossAttention(nn.Module):
    """The original TMT's MemoryAnchorCross, reproduced for `tmt_faithful_leaky` only.

    A sublayer of its own: queries W_q x from the tokens, keys and values W_k A,
    W_v A from M anchor vectors A (M, D) shared by the whole batch, softmax over
    the anchors, then W_o. In a *training* forward, after the output is
    computed, A <- 0.9 A + 0.1 mean(x) with the mean taken over every token of
    every row: a write outside autograd, so one row's tokens move the anchors
    that other rows read in the next step, and all anchors drift toward the same
    vector (the collapse the module docstring describes). Evaluation writes nothing.
    """

    ema_alpha = 0.9  # the original's fixed EMA factor

    def __init__(self, d_model: int, n_head: int, n_anchors: int, init_std: float = 0.02,
                 dropout: float = 0.0):
        super().__init__()
        self.n_head, self.head_dim = n_head, d_model // n_head
        self.memory = nn.Parameter(torch.randn(n_anchors, d_model) * init_std)
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.proj.residual_proj = True
        self.attn_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        nh, hd = self.n_head, self.head_dim
        q = self.q(x).view(b, s, nh, hd).transpose(1, 2)
        # a view, not the parameter itself: autograd then keeps this forward's anchors for
        # backward even after the EMA below rebinds the parameter's data (as in the original)
        mem = self.memory.view(self.memory.shape)
        k, v = (t.view(-1, nh, hd).transpose(0, 1) for t in self.kv(mem).chunk(2, dim=-1))
        attn = torch.einsum("bhsd,hmd->bhsm", q, k.to(q.dtype)) * hd ** -0.5
        out = torch.einsum("bhsm,hmd->bhsd", self.attn_dropout(attn.softmax(-1)), v.to(q.dtype))
        out = self.proj(out.transpose(1, 2).reshape(b, s, d))
        if self.training:
            with torch.no_grad():
                mean = x.mean(dim=(0, 1)).to(self.memory.dtype)
                # rebinding .data (as the original does) leaves this forward's graph on the old A
                self.memory.data = self.ema_alpha * self.memory.data + (1 - self.ema_alpha) * mean
        return out
