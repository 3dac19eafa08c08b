"""Does a memory model lose facts because of how much it read *before* them?

At 64k a trained ARMT recalls facts from the last tenth of the prompt less often than a
16k model recalls facts 245-490 segments back (docs/babilong.md, round 11), which points
at the memory's age when a fact is written, not at the fact's distance from the question.
This script measures that alone: every qa1 test question is laid out as background, then
the story's facts in one block, then the question (the `facts_last` layout), so the facts
sit right before the question and only the amount of background read before them changes.
A memory that ages well scores the same at every `--before`.

    python benchmarks/babilong_aging.py runs/armt-qa1 [more runs] --before 0,250,1000,2000 \
        [--n 50] [--name NAME]

`--before B` puts at least B segments of background before the facts (the context is
B segments plus room for the longest story). Writes benchmarks/results/NAME.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, print_table, run_cli, write_json  # noqa: E402

from memlm.data.babilong import BabilongBuilder, BabilongSample  # noqa: E402
from memlm.data.background import load_background  # noqa: E402
from memlm.errors import ConfigError  # noqa: E402
from memlm.eval.babilong import _generate, exact_match, extract_prediction  # noqa: E402
from memlm.models.streaming import segment_length  # noqa: E402
from memlm.train.run import load_run  # noqa: E402

#: context tokens kept for the facts block beyond the background segments (most qa1 test
#: stories fit in word tokens; longer ones are skipped, so every cell asks the same questions)
FACT_ROOM = 160


def aging_samples(builder: BabilongBuilder, before: int, segment: int, n: int
                  ) -> tuple[int, list[BabilongSample]]:
    """(C, samples): the first `n` qa1 test questions whose facts fit in FACT_ROOM tokens,
    each laid out as at least `before` segments of background, then its facts, then the
    question."""
    C = before * segment + FACT_ROOM
    samples = []
    for q in builder.questions("qa1", "test"):
        if len(samples) == n:
            break
        if builder.fits(q, FACT_ROOM):
            samples.append(builder.build("qa1", q, C, "test", facts_last=True))
    return C, samples


def aging_rows(model, builder: BabilongBuilder, before: list[int], n: int, batch_size: int = 50
               ) -> list[dict]:
    """Exact match per `before` over the first `n` qa1 test questions that fit."""
    rows = []
    for b in before:
        C, samples = aging_samples(builder, b, segment_length(model), n)
        groups: dict[int, list] = defaultdict(list)
        for s in samples:  # equal prompt lengths batch without padding
            groups[len(s.prompt())].append(s)
        hit, t0 = 0, time.time()
        for group in groups.values():
            for k in range(0, len(group), batch_size):
                part = group[k:k + batch_size]
                prompt = torch.from_numpy(np.stack([s.prompt() for s in part]).astype(np.int64))
                new = _generate(model, prompt, C, builder.eos, max_new_tokens=4).tolist()
                hit += sum(exact_match(extract_prediction(ids, builder.tokenizer, builder.eos),
                                       s.babi.answer) for s, ids in zip(part, new))
        rows.append({"before": b, "n": len(samples), "correct": hit,
                     "accuracy": round(100 * hit / max(len(samples), 1), 1),
                     "seconds": round(time.time() - t0, 1)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders of memory models (word tokenizer)")
    p.add_argument("--before", default="0,250,1000,2000",
                   help="segments of background before the facts, comma-separated")
    p.add_argument("--n", type=int, default=50, help="qa1 test questions per cell")
    p.add_argument("--babi", default=str(SHARED_DATA / "babi"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="babilong_aging")
    args = p.parse_args(argv)
    try:
        before = [int(x) for x in args.before.split(",") if x.strip()]
    except ValueError as e:
        raise ConfigError(f"--before takes whole segment counts like 0,250,1000, got "
                          f"{args.before!r}") from e
    if not before or min(before) < 0:
        raise ConfigError(f"--before needs counts >= 0, got {args.before!r}")
    torch.set_num_threads(args.threads)
    babi = args.babi if Path(args.babi).is_dir() else None
    out, table = {}, []
    for run in args.runs:
        model, tok = load_run(run)
        if not getattr(model, "is_stateful", False):
            raise ConfigError(f"{run} is not a memory model; this probe reads segments")
        model.eval()
        builder = BabilongBuilder(tok, load_background(None, tok, seed=0), seed=0,
                                  babi_dir=babi)
        rows = aging_rows(model, builder, before, args.n)
        out[str(run)] = rows
        print(f"{run}: " + ", ".join(f"{r['before']}: {r['accuracy']:.0f}%" for r in rows),
              flush=True)
        table.append({"run": str(run), **{f"before {r['before']}": f"{r['accuracy']:.0f}% of "
                                          f"{r['n']}" for r in rows}})
    print("qa1 exact match with the facts right before the question, by segments of filler "
          "read before them")
    print_table(table, list(table[0]))
    write_json(args.name, {"command": " ".join(["python", "benchmarks/babilong_aging.py",
                                                *(argv if argv is not None else sys.argv[1:])]),
                           "before": before, "n": args.n, "fact_room": FACT_ROOM, "runs": out})
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, "babilong_aging.py", argv)


if __name__ == "__main__":
    raise SystemExit(cli())
