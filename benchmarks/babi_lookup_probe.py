"""Can a 2-layer GPT learn the bAbI lookup itself? The backbone stage, isolated.

Every RMT of rounds 3-6 answered ~25% of the qa1 questions where two or more statements
about other people follow the supporting one: it had learned "name the most recently
mentioned place" (the shortcut), not "find the asked person's latest statement". This
probe trains the backbone alone, one bAbI story per row (every question answered in
place, as `data.source: babi:TASK` writes it), and scores every answer of the test
stories, split by how many statements follow the supporting one (0 / 1 / 2+; the
shortcut is right at 0 only). It runs in minutes, so the backbone's recipe can be
searched here before a BABILong run:

    python benchmarks/babi_lookup_probe.py                             # answers + rename
    python benchmarks/babi_lookup_probe.py --no-rename                 # memorises instead
    python benchmarks/babi_lookup_probe.py --set init_std=0.02         # memlm's default init
    python benchmarks/babi_lookup_probe.py --eval-run runs/gpt-babi-qa1  # score a trained run

`--score answers` (the default) puts the loss on the answers only; `--rename` (the
default) gives every row its own renaming of persons and rooms (`data.rename`), so no
story is seen twice. `--schedule-steps` sets the cosine's length when it should differ
from `--steps` (to stop a long schedule early). Prints one JSON line per `--eval-every`
steps to stderr and the final one to stdout (and appends it to --out).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit_row, machine, run_cli  # noqa: E402
from memory_merge_probe import parse_sets  # noqa: E402

import memlm  # noqa: E402
from memlm.data.babi import (  # noqa: E402
    MARKER,
    answer_token_mask,
    entity_token_groups,
    questions,
    story_documents,
)
from memlm.data.batches import rename_table  # noqa: E402
from memlm.data.tokenizers import load_tokenizer, make_tokenizer  # noqa: E402
from memlm.errors import ConfigError  # noqa: E402
from memlm.nn.loss import lm_loss  # noqa: E402
from memlm.types import IGNORE_INDEX  # noqa: E402


def story_rows(task: str, split: str, tok, babi_dir: str | None
               ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(inputs [N, T], targets [N, T] scored at the answers only, statements after the
    support of each answer in row order): one padded story per row."""
    docs = story_documents([task], split, babi_dir)
    after = []
    for _, story in itertools.groupby(questions(task, split, babi_dir),
                                      key=lambda q: q.story_index):
        after += [q.statements_after_support or 0 for q in story]  # 0 without support
    ids = [np.asarray(tok.encode(doc), dtype=np.int64) for doc in docs]
    T = max(len(x) for x in ids)
    inputs = torch.zeros(len(ids), T, dtype=torch.long)
    targets = torch.full((len(ids), T), IGNORE_INDEX, dtype=torch.long)
    for r, (x, doc) in enumerate(zip(ids, docs)):
        scored = answer_token_mask(x, tok, doc.count(MARKER))
        inputs[r, : len(x)] = torch.from_numpy(x)
        t = np.where(scored[1:], x[1:], IGNORE_INDEX)
        targets[r, : len(t)] = torch.from_numpy(t)
    return inputs, targets, after


def evaluate(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
             after: list[int]) -> dict[str, object]:
    """Share of answers whose first token is the argmax, overall and by statements after
    the support (0 / 1 / 2+)."""
    model.eval()
    right: list[bool] = []
    with torch.no_grad():
        for i in range(0, len(inputs), 100):
            x, y = inputs[i : i + 100], targets[i : i + 100]
            pred = model(x).logits.argmax(-1)
            for r in range(len(x)):
                pos = torch.nonzero(y[r] != IGNORE_INDEX).flatten()
                first = [int(p) for k, p in enumerate(pos) if k == 0 or pos[k - 1] != p - 1]
                right += [bool(pred[r, p] == y[r, p]) for p in first]
    model.train()
    if len(right) != len(after):
        raise AssertionError(f"{len(right)} answers scored for {len(after)} questions")
    by = [[ok for ok, a in zip(right, after) if min(a, 2) == k] for k in range(3)]
    return {"accuracy": round(float(np.mean(right)), 3), "n": len(right),
            "by_after": [round(float(np.mean(b)), 3) if b else None for b in by],
            "n_by_after": [len(b) for b in by]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="qa1", help="a bAbI task (synth-qa1 needs no files)")
    p.add_argument("--babi", help="bAbI v1.2 folder (default: $MEMLM_BABI_DIR or ../shared)")
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--schedule-steps", type=int, default=0,
                   help="the cosine schedule's length (default --steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--score", choices=("answers", "all"), default="answers")
    p.add_argument("--rename", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a model config field (repeatable; defaults: 2 layers, d 128, 4 heads, "
                        "init_std 0.088)")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-run", type=Path, metavar="RUN",
                   help="no training: score a trained run folder (word tokens) on the test "
                        "stories, e.g. a gpt-babi-qa1 backbone")
    p.add_argument("--out", type=Path, help="append the JSON line to this file")
    args = p.parse_args(argv)
    if args.eval_run is not None:
        return _eval_run(args)
    if args.steps < 1 or args.batch_size < 1:
        raise ConfigError("--steps and --batch-size must be at least 1")
    torch.set_num_threads(args.threads)
    tok = make_tokenizer("word")
    x_train, y_train, _ = story_rows(args.task, "train", tok, args.babi)
    x_test, y_test, after = story_rows(args.task, "test", tok, args.babi)
    if args.score == "all":  # every next token of the story (not the padding) is a target
        real = torch.cat([x_train[:, 1:] != 0, torch.zeros(len(x_train), 1, dtype=torch.bool)], 1)
        y_train = torch.where(real, torch.roll(x_train, -1, 1), IGNORE_INDEX)
    groups = entity_token_groups([args.task], tok, args.babi) if args.rename else []
    torch.manual_seed(args.seed)
    fields = {"vocab_size": tok.vocab_size, "n_layer": 2, "d_model": 128, "n_head": 4,
              "context_len": x_train.shape[1], "init_std": 0.088, **parse_sets(args.sets)}
    model = memlm.build("gpt", **fields)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01,
                            betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng([args.seed, 0x4E4D])
    horizon = args.schedule_steps or args.steps
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / 100) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(
            step, horizon) / horizon)))
        for group in opt.param_groups:
            group["lr"] = lr
        rows = torch.randint(len(x_train), (args.batch_size,), generator=g)
        x, y = x_train[rows], y_train[rows]
        if groups:
            table = rename_table(groups, tok.vocab_size, args.batch_size, rng)
            x = torch.gather(table, 1, x)
            y = torch.where(y == IGNORE_INDEX, y, torch.gather(table, 1, y.clamp(min=0)))
        loss = lm_loss(model(x).logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            acc = evaluate(model, x_test, y_test, after)
            print(json.dumps({"step": step, "loss": round(loss.item(), 3), **acc}),
                  file=sys.stderr, flush=True)
    row = {"task": args.task, "steps": args.steps, "schedule_steps": horizon,
           "seed": args.seed, "score": args.score, "rename": args.rename,
           "set": parse_sets(args.sets), "loss": round(loss.item(), 3),
           **evaluate(model, x_test, y_test, after), "machine": machine()}
    emit_row(row, args.out)
    return 0


def _eval_run(args: argparse.Namespace) -> int:
    """Score `args.eval_run` as the probe scores its own model (first answer token)."""
    torch.set_num_threads(args.threads)
    model = memlm.load(args.eval_run)
    tok = load_tokenizer(args.eval_run)
    if tok.kind != "word":
        raise ConfigError(f"{args.eval_run} uses {tok.name!r} tokens; the probe reads word "
                          "tokens (a gpt-babi-qa1 run)")
    x_test, y_test, after = story_rows(args.task, "test", tok, args.babi)
    row = {"task": args.task, "eval_run": str(args.eval_run),
           **evaluate(model, x_test, y_test, after), "machine": machine()}
    emit_row(row, args.out)
    return 0


def cli(argv: list[str] | None = None) -> int:
    """`main` with memlm's bad-input rule: one line naming the problem, exit status 2."""
    return run_cli(main, "babi_lookup_probe.py", argv)


if __name__ == "__main__":
    raise SystemExit(cli())
