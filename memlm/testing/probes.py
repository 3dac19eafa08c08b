"""Checks every architecture must pass; used by the test suite and `memlm audit`.

Each `check_*` returns the measured deviation (or raises AssertionError with a
clear message through the `assert_*` wrappers), so the same probe both proves
a property in tests and reports a number in the audit.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Callable
from typing import Any

import torch

from memlm.models.streaming import read_segments
from memlm.types import evaluating

Forward = Callable[..., Any]


def _logits(model, ids: torch.Tensor, state: Any = None) -> torch.Tensor:
    return model(ids, state=state).logits.float()


@torch.no_grad()
def check_causality(
    model, vocab_size: int, seq_len: int, cut: int | None = None, batch: int = 2,
    seed: int = 0, train_mode: bool = False, state_fn: Callable[[int], Any] | None = None,
) -> float:
    """Max |logit change| at positions <= cut when every token after `cut` changes."""
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    cut = seq_len // 2 if cut is None else cut
    a = torch.randint(0, vocab_size, (batch, seq_len), generator=g).to(device)
    b = a.clone()
    b[:, cut + 1 :] = (a[:, cut + 1 :] + torch.randint(1, vocab_size, (batch, seq_len - cut - 1),
                                                       generator=g).to(device)) % vocab_size
    was = model.training
    model.train(train_mode)
    try:
        torch.manual_seed(seed)
        la = _logits(model, a, state_fn(batch) if state_fn else None)
        torch.manual_seed(seed)
        lb = _logits(model, b, state_fn(batch) if state_fn else None)
    finally:
        model.train(was)
    return (la[:, : cut + 1] - lb[:, : cut + 1]).abs().max().item()


def assert_causal(model, vocab_size: int, seq_len: int, atol: float = 1e-5, **kw) -> None:
    """Changing future tokens leaves earlier logits unchanged, in eval and train mode."""
    for cut in (0, seq_len // 3, seq_len - 2):
        for train_mode in (False, True):
            dev = check_causality(model, vocab_size, seq_len, cut=cut, train_mode=train_mode, **kw)
            assert dev <= atol, (
                f"causality violated: logits at positions <= {cut} moved by {dev:.3g} "
                f"(train_mode={train_mode}) when only later tokens changed"
            )


@torch.no_grad()
def check_generation_causality(model, vocab_size: int, prompt_len: int = 8, new: int = 8,
                               seed: int = 0) -> float:
    """Inference path: incremental (cached) logits equal full-sequence logits.

    Incremental decoding only ever sees the past, so agreement with the full
    forward proves the full forward used no future tokens either.
    """
    return check_cache_equivalence(model, vocab_size, prompt_len, new, seed)


@torch.no_grad()
def check_cache_equivalence(model, vocab_size: int, prompt_len: int = 8, new: int = 8,
                            seed: int = 0, batch: int = 2) -> float:
    """Max |logit difference| between one-token-at-a-time decoding and one full forward."""
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab_size, (batch, prompt_len + new), generator=g).to(device)
    with evaluating(model):
        full = model(ids, state=model.init_state(batch, device)).logits.float()
        cache = model.make_cache(batch, model.config.context_len, device)
        state = model.init_state(batch, device)
        out = model(ids[:, :prompt_len], state=state, cache=cache)
        steps = [out.logits.float()]
        state = out.state
        for t in range(prompt_len, prompt_len + new):
            out = model(ids[:, t : t + 1], state=state, cache=cache)
            state = out.state
            steps.append(out.logits.float())
        inc = torch.cat(steps, dim=1)
    return (inc - full).abs().max().item()


@torch.no_grad()
def check_batch_independence(model, vocab_size: int, seq_len: int, seed: int = 0) -> float:
    """Max |logit change| of row 0 when the other rows of the batch change."""
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    a = torch.randint(0, vocab_size, (3, seq_len), generator=g).to(device)
    b = a.clone()
    b[1:] = torch.randint(0, vocab_size, (2, seq_len), generator=g).to(device)
    with evaluating(model):
        la = model(a, state=model.init_state(3, device)).logits.float()
        lb = model(b, state=model.init_state(3, device)).logits.float()
    return (la[0] - lb[0]).abs().max().item()


def check_save_load(model, ids: torch.Tensor) -> float:
    """Max |logit difference| after save_pretrained -> from_pretrained."""
    from memlm.models.base import MemLM

    was = model.training
    model.eval()
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        model.save_pretrained(d)
        loaded = MemLM.from_pretrained(d)
        loaded.eval()
        state = model.init_state(ids.shape[0], ids.device)
        a = model(ids, state=state).logits.float()
        b = loaded(ids, state=loaded.init_state(ids.shape[0], ids.device)).logits.float()
    model.train(was)
    return (a - b).abs().max().item()


def loss_curve(build: Callable[[], Any], vocab_size: int, seq_len: int, steps: int = 3,
               seed: int = 0) -> list[float]:
    """Train `steps` AdamW steps on seeded random data; return the losses."""
    torch.manual_seed(seed)
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    losses = []
    state = model.init_state(2)
    for _ in range(steps):
        ids = torch.randint(0, vocab_size, (2, seq_len + 1), generator=g)
        out = model(ids[:, :-1], targets=ids[:, 1:], state=state)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.on_train_step_end(len(losses) + 1, steps)
        state = model.detach_state(out.state)
        losses.append(out.loss.item())
    return losses


def params_without_grad(model, ids: torch.Tensor, state: Any = None) -> list[str]:
    """Names of trainable parameters whose gradient is missing or all zero."""
    model = copy.deepcopy(model)
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(ids[:, :-1], targets=ids[:, 1:], state=state)
    out.loss.backward()
    return [
        n for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)
    ]


@torch.no_grad()
def check_prefix_consistency(model, vocab_size: int, seq_len: int, prefix_len: int | None = None,
                             batch: int = 2, seed: int = 0) -> float:
    """Max |logit difference| between a prefix run alone and the same positions of the full run.

    A causal model cannot tell whether more tokens follow, so the first
    `prefix_len` logits must not depend on the sequence length (a model that
    normalises over the whole sequence or pads to a fixed length fails here).
    """
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    prefix_len = seq_len // 2 if prefix_len is None else prefix_len
    ids = torch.randint(0, vocab_size, (batch, seq_len), generator=g).to(device)
    with evaluating(model):
        full = model(ids, state=model.init_state(batch, device)).logits.float()
        part = model(ids[:, :prefix_len], state=model.init_state(batch, device)).logits.float()
    return (full[:, :prefix_len] - part).abs().max().item()


def random_token_floor(model, vocab_size: int, seq_len: int, steps: int = 100, lr: float = 1e-2,
                       batch: int = 8, eval_batches: int = 4, seed: int = 0) -> dict[str, float]:
    """Train a COPY of `model` on uniform random tokens, then score fresh uniform tokens.

    On tokens drawn uniformly from `vocab_size` values no causal predictor can
    beat a cross-entropy of log(vocab_size) on average (the gap is a KL
    divergence, never negative). A model that sees the token it must predict
    learns to copy it and drops far below. Returns the eval `nll` (nats/token),
    `ppl`, the `floor` log(vocab_size), `gap` = floor - nll (> 0 means better
    than possible) and the last `train_loss`. `model` itself is left untouched.
    Stateful models carry (detached) state across consecutive batches, as in training.
    """
    device = next(model.parameters()).device
    copy_ = copy.deepcopy(model)
    copy_.train()
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in copy_.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    state = copy_.init_state(batch, device)
    train_loss = float("nan")
    for step in range(steps):
        ids = torch.randint(0, vocab_size, (batch, seq_len + 1), generator=g).to(device)
        out = copy_(ids[:, :-1], targets=ids[:, 1:], state=state)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(copy_.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            copy_.on_train_step_end(step + 1, steps)
        state = copy_.detach_state(out.state)
        train_loss = out.lm_loss.item() if out.lm_loss is not None else out.loss.item()
    copy_.eval()
    g_eval = torch.Generator().manual_seed(seed + 1)
    total, count = 0.0, 0

    def batches():  # consecutive segments of `batch` streams of fresh uniform tokens
        for s in range(eval_batches):
            ids = torch.randint(0, vocab_size, (batch, seq_len + 1), generator=g_eval).to(device)
            yield ids[:, :-1], ids[:, 1:], s * seq_len

    with torch.no_grad():
        for step in read_segments(copy_, batches()):
            logits = step.output.logits.float()[..., :vocab_size]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, vocab_size), step.targets.reshape(-1), reduction="sum")
            total += nll.item()
            count += step.targets.numel()
    nll = total / count
    floor = math.log(vocab_size)
    return {"nll": nll, "ppl": math.exp(nll), "floor": floor, "gap": floor - nll,
            "train_loss": train_loss}
