"""Does a memory model keep old facts while it writes new ones? A synthetic probe.

bAbI qa1 asks for a person's latest place. Across segments that needs two skills:
*carry* (a fact written segments ago survives the segments after it) and *update* (the
facts of a new segment enter a memory that already holds older ones). BABILong mixes
both with language and a 2-layer backbone; this probe isolates them in minutes.

Tokens: 0 pad, 1 QUERY, 4 persons, 6 places, 20 noise symbols. Each context segment of
S tokens holds F (person, place) pairs at random places among noise; the final segment
opens with QUERY and a person who was mentioned, and is scored on the next token: that
person's latest place (chance 1/6). Accuracy is split by the *depth* of that latest fact:
0 is the segment just before the question, n-1 the first one. A model that only carries
(never writes into a non-empty memory) is right at the deepest depth only; one that only
updates (replaces its memory) at depth 0 only; one that merges, at every depth.

    python benchmarks/memory_merge_probe.py --arch rmt --schedule 1 --steps 2000
    python benchmarks/memory_merge_probe.py --arch rmt --schedule "1:1000;1,2" --steps 3000
    python benchmarks/memory_merge_probe.py --arch gpt --schedule "1,2" --steps 3000  # control

The control (`--arch gpt`) is the same 2-layer backbone attending to the whole episode,
with no memory: where it fails too, the memory models' failure is the lookup's, not the
memory's (round 6 of docs/babilong.md: it shows the same depth split as RMT and ARMT).

`--schedule` lists the context-segment counts to train on: "1,2" draws 1 or 2 per batch
uniformly, "1:1000;2" trains on 1 until step 1,000 and on 2 after. Prints one JSON line
(and appends it to --out): accuracy at 1, 2, 3, 4 and 8 context segments, and by depth.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit_row, machine, run_cli  # noqa: E402

import memlm  # noqa: E402
from memlm.errors import ConfigError  # noqa: E402
from memlm.types import IGNORE_INDEX  # noqa: E402

S, F = 16, 3  # tokens per segment, facts per context segment
QUERY, PERSON0, N_PERSONS, PLACE0, N_PLACES, NOISE0, VOCAB = 1, 2, 4, 6, 6, 12, 32
EVAL_COUNTS = (1, 2, 3, 4, 8)


def episodes(g: torch.Generator, batch: int, n_ctx: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs [B, (n_ctx+1)*S], targets, depth [B]) of `batch` fresh episodes."""
    x = torch.randint(NOISE0, VOCAB, (batch, n_ctx + 1, S), generator=g)
    rows = torch.arange(batch)
    latest = torch.full((batch, N_PERSONS), -1)
    where = torch.full((batch, N_PERSONS), -1)
    for s in range(n_ctx):
        # F distinct even slots (a fact takes two tokens), in order
        slots = torch.rand(batch, S // 2 - 1, generator=g).argsort(-1)[:, :F].sort(-1).values * 2
        who = torch.randint(N_PERSONS, (batch, F), generator=g)
        place = torch.randint(N_PLACES, (batch, F), generator=g)
        for f in range(F):  # in order, so a later fact about a person overrides
            x[rows, s, slots[:, f]] = PERSON0 + who[:, f]
            x[rows, s, slots[:, f] + 1] = PLACE0 + place[:, f]
            latest[rows, who[:, f]] = place[:, f]
            where[rows, who[:, f]] = s
    # ask about a person who was mentioned (every row mentions at least one)
    weights = (latest >= 0).float()
    ask = torch.multinomial(weights, 1, generator=g)[:, 0]
    x[:, -1] = 0
    x[:, -1, 0], x[:, -1, 1] = QUERY, PERSON0 + ask
    y = torch.full_like(x, IGNORE_INDEX)
    y[:, -1, 1] = PLACE0 + latest[rows, ask]
    depth = n_ctx - 1 - where[rows, ask]
    return x.reshape(batch, -1), y.reshape(batch, -1), depth


def parse_schedule(text: str, steps: int) -> list[tuple[int, list[int]]]:
    """'1:1000;1,2' -> [(1000, [1]), (steps, [1, 2])]: (until step, counts to draw from)."""
    plan = []
    try:
        for part in text.split(";"):
            counts, _, until = part.partition(":")
            plan.append((int(until) if until else steps, [int(c) for c in counts.split(",")]))
    except ValueError:
        raise ConfigError(f"--schedule {text!r} is not COUNTS[:UNTIL];...; write e.g. "
                          "'1' or '1,2' or '1:1000;1,2'") from None
    if any(c < 1 for _, counts in plan for c in counts) or plan[-1][0] < steps:
        raise ConfigError(f"--schedule {text!r}: counts must be >= 1 and the last part must "
                          f"run to the end (leave its :UNTIL off)")
    return plan


def parse_sets(items: list[str]) -> dict[str, object]:
    """--set KEY=VALUE model fields (YAML values: `memory_from=pre_norm`, `read_cap=1.0`)."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--set {item!r} is not KEY=VALUE; write e.g. --set n_layer=4")
        out[key] = yaml.safe_load(value)
    return out


def build(arch: str, seed: int, **fields: object) -> torch.nn.Module:
    """A fresh model; `gpt` is the control: the same backbone attending to the whole episode.

    The control needs no memory, so what it cannot do is the lookup itself (find the asked
    person's latest fact), not carrying or updating a memory: the memory models can only be
    judged against it.
    """
    torch.manual_seed(seed)
    size = dict(vocab_size=VOCAB, n_layer=2, d_model=64, n_head=4)
    if arch == "gpt":
        return memlm.build("gpt", **{**size, "context_len": (max(EVAL_COUNTS) + 1) * S,
                                     **fields})
    if arch not in ("rmt", "armt"):
        raise ConfigError(f"--arch {arch!r}: the probe runs rmt, armt or the dense control gpt")
    size.update(context_len=S, segment_len=S, num_mem_tokens=8)
    return memlm.build(arch, **{**size, **fields})


def evaluate(model: torch.nn.Module, rows: int = 512) -> dict[str, object]:
    """Held-out accuracy per context-segment count, and per depth of the answer's fact."""
    model.eval()
    g = torch.Generator().manual_seed(10_000)
    out: dict[str, object] = {}
    with torch.no_grad():
        for n in EVAL_COUNTS:
            x, y, depth = episodes(g, rows, n)
            pos = x.shape[1] - S + 1  # the answer: right after QUERY, person
            ok = (model(x).logits[:, pos].argmax(-1) == y[:, pos]).float()
            out[f"n{n}"] = round(ok.mean().item(), 3)
            out[f"n{n}_by_depth"] = [round(ok[depth == d].mean().item(), 3)
                                     if (depth == d).any() else None for d in range(n)]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="rmt", help="rmt or armt")
    p.add_argument("--schedule", default="1", help="context segments to train on (see above)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a model config field, e.g. n_layer=4 or memory_from=pre_norm "
                        "(repeatable; the defaults: 2 layers, d 64, 8 memory tokens)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="also print the held-out accuracy every N steps (to stderr)")
    p.add_argument("--out", type=Path, help="append the JSON line to this file")
    args = p.parse_args(argv)
    plan = parse_schedule(args.schedule, args.steps)
    sets = parse_sets(args.sets)
    torch.set_num_threads(args.threads)
    model = build(args.arch, args.seed, **sets)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        counts = next(c for until, c in plan if step < until)
        n = counts[int(torch.randint(len(counts), (1,), generator=g))]
        x, y, _ = episodes(g, args.batch_size, n)
        model.train()
        loss = model(x, targets=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            acc = evaluate(model, rows=256)
            print(json.dumps({"step": step + 1, **{k: v for k, v in acc.items()
                                                   if not k.endswith("depth")}}),
                  file=sys.stderr, flush=True)
    row = {"arch": args.arch, "schedule": args.schedule, "steps": args.steps,
           "seed": args.seed, "set": sets, **evaluate(model), "machine": machine()}
    emit_row(row, args.out)
    return 0


def cli(argv: list[str] | None = None) -> int:
    """`main` with memlm's bad-input rule: one line naming the problem, exit status 2."""
    return run_cli(main, "memory_merge_probe.py", argv)


if __name__ == "__main__":
    raise SystemExit(cli())
