"""Autoregressive generation for every memlm model.

With a KV cache (when the model offers one) the prompt is run once and then one
token at a time; without, the whole sequence is re-run each step. Both paths
thread the model's memory `state`, so stateful models generate correctly, and a
test proves the two paths give the same greedy tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token from [B, V] logits; temperature 0 means greedy."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, idx = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Iterable[int] = (),
    use_cache: bool = True,
    state: Any = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return input_ids extended by up to `max_new_tokens` tokens.

    A row that emits a stop token keeps emitting it (padding) so the batch stays
    rectangular; generation ends early when every row has stopped.
    """
    was_training = model.training
    model.eval()
    stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=input_ids.device)
    ctx_len = model.config.context_len
    b = input_ids.shape[0]
    if state is None:
        state = model.init_state(b, input_ids.device)
    cache = model.make_cache(b, ctx_len, input_ids.device) if use_cache else None
    ids = input_ids
    done = torch.zeros(b, dtype=torch.bool, device=ids.device)
    try:
        if cache is not None:
            prompt = ids[:, -ctx_len:]
            out = model(prompt, state=state, cache=cache)
            state = out.state
            logits = out.logits[:, -1]
        for step in range(max_new_tokens):
            if cache is None:
                window = ids[:, -ctx_len:]
                logits = model(window, state=state).logits[:, -1]
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            if stop.numel():
                nxt = torch.where(done, ids[:, -1], nxt)
                done |= torch.isin(nxt, stop)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if stop.numel() and bool(done.all()):
                break
            if cache is not None and step < max_new_tokens - 1:
                if cache.length >= ctx_len:
                    # context full: restart the cache on the most recent window
                    cache.reset()
                    out = model(ids[:, -ctx_len:], state=model.init_state(b, ids.device),
                                cache=cache)
                else:
                    out = model(nxt[:, None], state=state, cache=cache)
                state = out.state
                logits = out.logits[:, -1]
    finally:
        model.train(was_training)
    return ids


def generate_text(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, *,
                  stop: Iterable[str] = (), stop_eot: bool = False, seed: int = 0,
                  **sampling: Any) -> str:
    """`memlm generate`: text in, prompt plus continuation out.

    Each `stop` string stops at its first token; `stop_eot` also stops at the
    tokenizer's end-of-text id. `sampling` takes generate's temperature, top_k, top_p
    and use_cache; `seed` fixes the sampled tokens.
    """
    from memlm.errors import DataError

    ids = tokenizer.encode(prompt)
    if not ids:
        raise DataError("the prompt is empty after tokenisation; give --prompt some text.")
    stop_ids = [t for s in stop for t in tokenizer.encode(s)[:1]]
    if stop_eot and tokenizer.eot_id is not None:
        stop_ids.append(tokenizer.eot_id)
    g = torch.Generator().manual_seed(seed)
    out = model.generate(torch.tensor([ids]), max_new_tokens, stop_tokens=stop_ids, generator=g,
                         **sampling)
    return tokenizer.decode(out[0].tolist())
