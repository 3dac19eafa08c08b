"""Autoregressive generation for every memlm model (public home of the one loop).

The loop lives in `memlm/models/generation.py` so that `MemLM.generate` can call it
without importing upwards; this module is where users and tools import it from, and
where text goes in and out (`generate_text`, behind `memlm generate`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from memlm.models.generation import Decoding, generate, sample_next

__all__ = ["Decoding", "generate", "generate_text", "sample_next"]


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
