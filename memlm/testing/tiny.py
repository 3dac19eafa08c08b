"""Tiny *trained* models for conformance checks that random weights cannot make.

A randomly initialised model's greedy output is nearly constant, so two decoding paths
that see different context often still agree by accident. After a few hundred steps on
a small learnable corpus the argmax depends on the context, and a disagreement shows.

    tokens = tiny_corpus(20_000, seed=0)             # ids of a small generated text
    model = train_tiny("armt", tokens, steps=200)    # eval mode, seeded, CPU seconds

Only memlm's public model interface is used (build, forward with state, detach_state,
on_train_step_end), so this also runs against older memlm versions (for before/after
measurements).
"""

from __future__ import annotations

import random
from typing import Any

import torch

#: the corpus alphabet: ids are positions in this string, which is sorted, so they are
#: also the ids of memlm's char tokenizer fitted on it (whose end of text is id 28)
ALPHABET = " .abcdefghijklmnopqrstuvwxyz"

_NAMES = ["mia", "tom", "ava", "leo", "zoe", "sam", "ivy", "max"]
_VERBS = ["sees", "likes", "finds", "keeps", "takes", "hides"]
_THINGS = ["the red box", "a blue cup", "the old key", "a small dog", "the green hat", "a map"]
_PLACES = ["in the barn", "at the lake", "by the door", "on the hill", "under the bed"]


def tiny_corpus(n_tokens: int, seed: int = 0) -> torch.Tensor:
    """Ids [n_tokens] of generated sentences ("mia finds the old key by the door. ...")."""
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_tokens:
        s = (f"{rng.choice(_NAMES)} {rng.choice(_VERBS)} {rng.choice(_THINGS)} "
             f"{rng.choice(_PLACES)}. ")
        parts.append(s)
        size += len(s)
    text = "".join(parts)[:n_tokens]
    return torch.tensor([ALPHABET.index(c) for c in text], dtype=torch.long)


def tiny_config(arch: str) -> dict[str, Any]:
    """Build arguments of a tiny `arch` model over the corpus alphabet (segments of 16)."""
    cfg: dict[str, Any] = dict(vocab_size=len(ALPHABET) + 1, n_layer=2, d_model=32, n_head=4,
                               context_len=16, dropout=0.0)
    if arch in ("rmt", "armt"):
        cfg["num_mem_tokens"] = 2
    if arch == "armt":
        cfg["d_mem"] = 8
    return cfg


def train_tiny(arch: str, tokens: torch.Tensor, steps: int = 200, batch: int = 8,
               lr: float = 3e-3, seed: int = 0) -> Any:
    """A tiny `arch` model trained on `tokens` for `steps` AdamW steps; eval mode.

    Stateful models read `batch` contiguous rows of the corpus segment by segment with
    their state carried (detached) and restarted at each pass, as the trainer does;
    stateless ones see random windows.
    """
    from memlm.registry import build

    torch.manual_seed(seed)
    model = build(arch, **tiny_config(arch))
    L = int(model.config.context_len)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    row = (tokens.numel() - 1) // batch
    rows = torch.arange(batch)[:, None] * row
    stateful = bool(getattr(model, "is_stateful", False))
    state, pos = None, 0
    model.train()
    for step in range(steps):
        if stateful:
            if pos + L + 1 > row:
                state, pos = None, 0
            idx = rows + pos + torch.arange(L + 1)
            pos += L
        else:
            starts = torch.randint(0, tokens.numel() - L - 1, (batch, 1), generator=g)
            idx = starts + torch.arange(L + 1)
        ids = tokens[idx]
        if state is None and stateful:
            state = model.init_state(batch)
        out = model(ids[:, :-1], targets=ids[:, 1:], state=state)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.on_train_step_end(step + 1, steps)
        if stateful:
            state = model.detach_state(out.state)
    return model.eval()
