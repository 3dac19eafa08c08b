"""Long-range recall accuracy on the built-in recall corpus, bucketed by distance.

A recalled answer ("what is the code of mia? 4821.") counts as correct when the
model's greedy next-token prediction is right for every token of the answer,
teacher-forced on the true text. Stateful models read the text as one stream
(segments of their window with the memory state carried); stateless models read
it through sliding windows, so every prediction has at least half a window of
context. An answer whose fact lies further back than the window can only be
right through memory (or by chance: 1 in 10^digits).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from memlm.eval.perplexity import autocast_context


@torch.no_grad()
def greedy_predictions(model, ids: list[int] | np.ndarray, seq_len: int | None = None,
                       precision: str = "bf16") -> np.ndarray:
    """argmax prediction for the token after each position 0..n-2 of `ids`."""
    device = next(model.parameters()).device
    ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    n = len(ids_t)
    seq_len = seq_len or model.config.context_len
    preds = np.zeros(n - 1, dtype=np.int64)
    was = model.training
    model.eval()
    try:
        if getattr(model, "is_stateful", False):
            state = model.init_state(1, device)
            for lo in range(0, n - 1, seq_len):
                hi = min(lo + seq_len, n - 1)
                with autocast_context(device, precision):
                    out = model(ids_t[None, lo:hi].to(device), state=state)
                state = out.state
                preds[lo:hi] = out.logits[0].argmax(-1).cpu().numpy()
        else:
            # score chunks of half a window, each with the window that ends at the chunk
            stride = max(seq_len // 2, 1)
            for a in range(0, n - 1, stride):
                b = min(a + stride, n - 1)
                start = max(0, b - seq_len)
                with autocast_context(device, precision):
                    logits = model(ids_t[None, start:b].to(device)).logits[0]
                preds[a:b] = logits[a - start :].argmax(-1).cpu().numpy()
    finally:
        model.train(was)
    return preds


def recall_accuracy(model, tokenizer, text: str, spans, window: int | None = None,
                    precision: str = "bf16") -> dict[str, Any]:
    """Exact-answer accuracy for recalls within and beyond the model's window (in tokens)."""
    from memlm.data.synthetic import spans_to_tokens

    ids, token_spans = spans_to_tokens(text, spans, tokenizer)
    window = window or model.config.context_len
    preds = greedy_predictions(model, ids, precision=precision)
    ids_np = np.asarray(ids)
    near, far = [], []
    for ts in token_spans:
        lo = max(ts.start, 1)
        ok = bool(np.all(preds[lo - 1 : ts.end - 1] == ids_np[lo : ts.end]))
        (near if ts.token_gap <= window else far).append(ok)
    return {
        "recall_near": float(np.mean(near)) if near else float("nan"),
        "recall_far": float(np.mean(far)) if far else float("nan"),
        "n_near": len(near),
        "n_far": len(far),
    }
