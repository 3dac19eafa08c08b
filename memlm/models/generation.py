"""Autoregressive generation for every memlm model: one policy, one loop.

    ids = model.generate(prompt, max_new_tokens=50)            # memlm
    ids = MemlmForCausalLM.from_memlm(model).generate(prompt)  # transformers: same tokens

`Decoding` reads a sequence incrementally and is the only place that decides what a
model sees while generating; `generate` (memlm) and `MemlmForCausalLM` (transformers'
`generate` and `pipeline`) both drive it, so their greedy tokens agree token for token.
What a model sees depends on one capability it declares:

* **stateful** (`is_stateful`: RMT, ARMT, DNC, TMT-xmem): the whole prompt is read,
  never cut. Its segments are cut by the model's own rule (`models/streaming.py`); all
  but the last go through the segment loop with the memory carried, the last one opens
  the KV cache. Generated tokens extend that open segment. A model whose cache is
  `unbounded_cache` (RecurrentLM: the cache rolls over into memory by itself) is fed
  every token; any other stateful model starts a new segment when its window is full:
  the KV cache is emptied and the memory, which has read every token, is kept. So
  generating is reading: the memory after n generated tokens is the memory a read of
  prompt + those n tokens would leave, with the same cuts.
* **stateless** (GPT, GMT, TMT): the model sees the last `context_len` tokens; when
  the cache is full it restarts on the latest window.

Without a cache (`use_cache=False`, or a model without one) every step re-reads the
sequence: a stateful model through the segment loop from its starting state, a
stateless one its last window. Both paths give the same greedy tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from memlm.models.streaming import (
    read,
    read_segments,
    segment_alignment,
    segment_bounds,
    segment_length,
)
from memlm.types import evaluating


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


class Decoding:
    """One sequence being read incrementally: `feed(ids)` -> logits of the newest tokens.

    Holds the tokens read so far, the model's KV cache (None without one) and its
    memory state. The first `feed` is the prompt; later ones extend it. The model
    should be in eval mode and grad disabled (as `generate` does).
    """

    def __init__(self, model: Any, batch_size: int, device: torch.device | str,
                 state: Any = None, use_cache: bool = True) -> None:
        self.model = model
        self.batch_size, self.device = batch_size, device
        self.stateful = bool(getattr(model, "is_stateful", False))
        self.unbounded = bool(getattr(model, "unbounded_cache", False))
        self.window = segment_length(model) if self.stateful else int(model.config.context_len)
        self.start_state = state if state is not None else model.init_state(batch_size, device)
        self.state = self.start_state
        self.cache = (model.make_cache(batch_size, model.config.context_len, device)
                      if use_cache else None)
        self.ids: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """Tokens read so far."""
        return 0 if self.ids is None else self.ids.shape[1]

    def feed(self, new: torch.Tensor) -> torch.Tensor:
        """Read `new` [B, n] ids; return the logits [B, k, V] of the last k <= n of them
        (k = n except where a stateless window or a prompt's committed segments drop some)."""
        first = self.ids is None
        self.ids = new if first else torch.cat([self.ids, new], dim=1)
        if self.cache is None:
            return self._reread(new.shape[1])
        if first:
            return self._prompt(new)
        if self.stateful:
            return self._extend(new)
        if self.cache.length + new.shape[1] > self.window:  # window full: restart on the latest
            self.cache.reset()
            out = self.model(self.ids[:, -self.window:], state=self.start_state, cache=self.cache)
            return out.logits[:, -new.shape[1]:]
        return self.model(new, state=self.start_state, cache=self.cache).logits

    def _reread(self, n: int) -> torch.Tensor:
        if self.stateful:  # every segment again, from the starting memory
            out = read(self.model, self.ids, self.start_state)
            self.state = out.state
            return out.logits[:, -n:]
        return self.model(self.ids[:, -self.window:], state=self.start_state).logits[:, -n:]

    def _prompt(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.stateful:
            return self.model(ids[:, -self.window:], state=self.start_state,
                              cache=self.cache).logits
        bounds = segment_bounds(ids.shape[1], self.window, segment_alignment(self.model))
        done = [(ids[:, a:b], None, a) for a, b in bounds[:-1]]
        parts = []
        for step in read_segments(self.model, done, self.state):
            self.state = step.state
            parts.append(step.output.logits)
        out = self.model(ids[:, bounds[-1][0]:], state=self.state, cache=self.cache)
        self.state = out.state
        parts.append(out.logits)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _extend(self, new: torch.Tensor) -> torch.Tensor:
        parts, pos = [], 0
        while pos < new.shape[1]:
            room = new.shape[1] - pos
            if not self.unbounded:
                if self.cache.length >= self.window:  # next segment: memory kept, KV emptied
                    self.cache.reset()
                room = min(room, self.window - self.cache.length)
            out = self.model(new[:, pos : pos + room], state=self.state, cache=self.cache)
            self.state = out.state
            parts.append(out.logits)
            pos += room
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


@torch.no_grad()
def generate(
    model: Any,
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
    """Return input_ids extended by up to `max_new_tokens` tokens (see the module docstring).

    `state`: the memory a stateful model starts from (e.g. after reading a context).
    A row that emits a stop token keeps emitting it (padding) so the batch stays
    rectangular; generation ends early when every row has stopped.
    """
    b, device = input_ids.shape[0], input_ids.device
    stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    ids = input_ids
    with evaluating(model):
        reader = Decoding(model, b, device, state=state, use_cache=use_cache)
        logits = reader.feed(ids)[:, -1]
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            if stop.numel():
                nxt = torch.where(done, ids[:, -1], nxt)
                done |= torch.isin(nxt, stop)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if stop.numel() and bool(done.all()):
                break
            if step < max_new_tokens - 1:
                logits = reader.feed(nxt[:, None])[:, -1]
    return ids
