"""Does a BABILong model look the fact up, or answer with what was said last?

qa1 asks where a person is. Answering with the place of the story's most recent statement
is right whenever that statement is the supporting one (about half of qa1's questions),
so a model can reach ~55% without ever matching the person asked about. This script
scores a run on held-out *training-layout* rows (the `babilong:` source's val split, at
the run's own sample length) and splits the answer's top-1 accuracy by how many story
statements follow the supporting one: 0 (the shortcut is right), 1, 2 or more (it is
wrong). A model that learned the task is good in every column; one that learned the
shortcut is good in the first only. `benchmarks/babilong.py` gives the same split on test
questions at the named lengths.

`--misses` also says where each wrong answer came from: the place of the last statement,
of the one before it, of an earlier one, or a place the story never named, and whether
that statement is about the person asked. A memory that keeps only the most recent
statements answers from "last" and "2nd last" about other persons; one that does not
match persons answers from statements about other persons at any rank. The place is the
answer's first token, so the sources are exact with word tokens (one token per place).

    python benchmarks/babilong_shortcut.py runs/rmt-qa1-s0 --seq-len 128 [--misses]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, qa1_asked, qa1_move, rows_spec  # noqa: E402

from memlm.config import load_run_config  # noqa: E402
from memlm.data.babilong import babilong_source  # noqa: E402
from memlm.train.run import load_run  # noqa: E402

RANKS = ("last", "2nd last", "earlier")


def miss_source(facts: tuple[str, ...], question: str, predicted: str) -> str:
    """Where a wrong qa1 answer came from: the newest statement that ends with the predicted
    place, by its rank from the end and whether it is about the person asked, or
    "not in the story"."""
    person = qa1_asked(question)
    for k, fact in enumerate(reversed(facts)):
        move = qa1_move(fact)
        if move is not None and move[1] == predicted:
            whose = "same person" if move[0] == person else "other person"
            return f"{RANKS[min(k, 2)]}, {whose}"
    return "not in the story"


def shortcut_split(run: str | Path, seq_len: int, rows: int = 512, seed: int = 123,
                   babi: str | None = None) -> dict:
    """Top-1 hits of the answer's first token by statements after the support (0, 1, 2+),
    and the sources of the misses per column (`miss_source`)."""
    model, tok = load_run(run)
    model.eval()
    cfg = load_run_config(Path(run) / "run.yaml") if (Path(run) / "run.yaml").exists() else None
    spec = rows_spec(cfg.data.source if cfg else "babilong:qa1:segment=64", babi=babi)
    src = babilong_source(spec, tokenizer=tok, batch_size=64, seq_len=seq_len, seed=seed,
                          split="val")
    n, hit = np.zeros(3, int), np.zeros(3, int)
    misses: list[Counter] = [Counter() for _ in range(3)]
    for _ in range((rows + 63) // 64):
        batch, samples = src.next_batch_with_samples()
        with torch.no_grad():  # every row is a new sample: a stateful model starts empty
            logits = model(batch.input_ids).logits
        for r, sample in enumerate(samples):
            after = sample.statements_after_support
            if after is None:
                continue
            pos = int((batch.targets[r] >= 0).nonzero()[0])  # the answer's first token
            col, guess = min(after, 2), int(logits[r, pos].argmax())
            n[col] += 1
            if guess == batch.targets[r, pos]:
                hit[col] += 1
            else:
                misses[col][miss_source(sample.babi.facts, sample.babi.question,
                                        tok.decode([guess]).strip())] += 1
    return {"n": n.tolist(), "correct": hit.tolist(), "misses": [dict(m) for m in misses]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--seq-len", type=int, default=128, help="sample length (128: 2 segments)")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--babi", default=str(SHARED_DATA / "babi"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--misses", action="store_true",
                   help="also where the wrong answers came from, per column")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    babi = args.babi if Path(args.babi).is_dir() else None
    print("answer top-1 by statements after the supporting one: 0 (most recent) | 1 | 2+")
    for run in args.runs:
        out = shortcut_split(run, args.seq_len, args.rows, babi=babi)
        cells = " | ".join(f"{100 * c / k:.0f}% of {k}" if k else "-"
                           for c, k in zip(out["correct"], out["n"]))
        print(f"{run}: {cells}")
        if args.misses:
            for col, found in zip(("0", "1", "2+"), out["misses"]):
                where = ", ".join(f"{k}: {v}" for k, v in sorted(found.items(), key=lambda kv: -kv[1]))
                print(f"  misses with {col} after: {where or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
