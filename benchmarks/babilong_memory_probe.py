"""Does an RMT or ARMT write the facts into its memory? A linear probe of the memory.

In a row of memlm's BABILong protocol every qa1 fact sits in the context segments and the
question opens the last segment, so all the answer needs must be in the memory the
context segments leave: RMT's memory vectors, or ARMT's associative matrices A and
normalisers z of every layer (the state its reads are computed from; a read is linear in
A for a given query). This script runs the context segments of each row (one by default;
`--context-segments 2` probes the memory after an update, where 3-segment rows fail),
takes that memory, and fits one linear classifier per person (from the flattened memory
to the person's latest place; L2-regularised, full batch) on rows of the training split,
then scores it on rows of the held-out val split (other stories).

Both numbers are split by whether the person's latest fact is the story's last
statement ("last": the most-recent-place shortcut is right) or not ("earlier"):

- probe: what a reader *could* get from the memory;
- model: what the model answers when that person is asked about (its own read).

A memory that holds the bindings gives a probe far above chance in "earlier"; if the
model's answers stay at the shortcut there, the read is the wall. A probe near the
shortcut's level in "earlier" means the write is.

    python benchmarks/babilong_memory_probe.py runs/rmt-qa1-s0
    python benchmarks/babilong_memory_probe.py runs/armt-qa1-s0 --context-segments 2
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, emit_row, machine, qa1_asked, qa1_move, rows_spec, run_cli  # noqa: E402

from memlm.config import load_run_config  # noqa: E402
from memlm.data.babi import TASK_LABELS  # noqa: E402
from memlm.data.babilong import babilong_source  # noqa: E402
from memlm.errors import ConfigError  # noqa: E402
from memlm.train.run import load_run  # noqa: E402

ROOMS = TASK_LABELS["qa1"]  # the six rooms, in the order of the probe's classes


def latest_places(facts: tuple[str, ...]) -> tuple[dict[str, int], str | None]:
    """{person: index of their latest room} and the person of the last statement."""
    latest: dict[str, int] = {}
    last = None
    for fact in facts:
        move = qa1_move(fact)
        if move is None:
            raise ConfigError(f"not a qa1 statement: {fact!r}; the memory probe reads qa1 only")
        last, room = move
        latest[last] = ROOMS.index(room)
    return latest, last


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float = 1e-2,
              iters: int = 200) -> torch.Tensor:
    """Weights [d + 1, classes] of an L2-regularised softmax regression on (x, y)."""
    xb = torch.cat([x, torch.ones(len(x), 1)], 1)
    w = torch.zeros(xb.shape[1], classes, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xb @ w, y) + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def predict(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (torch.cat([x, torch.ones(len(x), 1)], 1) @ w).argmax(-1)


def memory_features(state) -> torch.Tensor:
    """[B, F] float32: the memory a stateful model carries, flattened per row (RMT's memory
    vectors; ARMT's A and z of every layer). Other states are refused in one line."""
    if hasattr(state, "memory"):  # RMTState
        return state.memory.float().flatten(1)
    if hasattr(state, "layers"):  # ARMTState: one (A, z) per wrapped layer
        return torch.cat([t.float().flatten(1) for layer in state.layers for t in layer], 1)
    raise ConfigError(f"the memory probe reads RMT or ARMT memory, not {type(state).__name__}")


def collect(model, tok, spec: str, split: str, rows: int, seq_len: int, segment: int,
            seed: int) -> list[dict]:
    """Per (row, person in the row): memory after the context segments (all but the last
    of the row's seq_len // segment), label, shortcut flag, and whether the model names the
    right room when that row's own question is asked."""
    src = babilong_source(spec, tokenizer=tok, batch_size=64, seq_len=seq_len, seed=seed,
                          split=split)
    room_ids = [tok.encode(" " + r)[-1] for r in ROOMS]
    context = seq_len - segment  # the question opens the last segment
    out = []
    for _ in range((rows + 63) // 64):
        batch, samples = src.next_batch_with_samples()
        with torch.no_grad():  # the context segments, then the question from their memory
            first = model(batch.input_ids[:, :context])
            logits = model(batch.input_ids[:, context:], state=first.state).logits
        memory = memory_features(first.state)  # [64, F]
        for r, sample in enumerate(samples):
            latest, last = latest_places(sample.babi.facts)
            pos = int((batch.targets[r] >= 0).nonzero()[0]) - context  # in the last segment
            asked = qa1_asked(sample.babi.question)
            answer = int(logits[r, pos, room_ids].argmax())
            for person, room in latest.items():
                out.append({"x": memory[r], "person": person, "room": room,
                            "last": person == last,
                            "model": (answer == room) if person == asked else None})
    return out


def probe_run(run: str | Path, rows: int = 2048, test_rows: int = 1024, seed: int = 123,
              babi: str | None = None, context_segments: int = 1) -> dict:
    model, tok = load_run(run)
    model.eval()
    cfg = load_run_config(Path(run) / "run.yaml")
    if cfg.model.arch not in ("rmt", "armt"):
        raise ConfigError(f"{run} is {cfg.model.arch!r}; the memory probe reads an RMT's "
                          "memory tokens or an ARMT's associative memory (arch: rmt or armt)")
    if context_segments < 1:
        raise ConfigError(f"--context-segments must be at least 1, got {context_segments}")
    segment = int(cfg.model.segment_len)
    spec = rows_spec(cfg.data.source, drop=("min_segments", "facts_last"))
    if not re.match(r"babilong:(synth-)?qa1(:|$)", spec) or f"segment={segment}" not in spec:
        raise ConfigError(f"{run} trained on {spec!r}; the probe needs babilong:qa1 rows "
                          f"with segment={segment}")
    spec = rows_spec(spec, drop=(), babi=babi)
    seq_len = (context_segments + 1) * segment
    train = collect(model, tok, spec, "train", rows, seq_len, segment, seed)
    test = collect(model, tok, spec, "val", test_rows, seq_len, segment, seed)
    x_all = torch.stack([e["x"] for e in train])
    mean, std = x_all.mean(0), x_all.std(0).clamp_min(1e-6)
    result: dict = {"run": str(run), "arch": cfg.model.arch, "rows": rows,
                    "test_rows": test_rows, "context_segments": context_segments,
                    "features": int(x_all.shape[1])}
    hits = {"last": [0, 0], "earlier": [0, 0]}
    for person in sorted({e["person"] for e in train}):
        tr = [e for e in train if e["person"] == person]
        te = [e for e in test if e["person"] == person]
        if not te:
            continue
        w = fit_probe((torch.stack([e["x"] for e in tr]) - mean) / std,
                      torch.tensor([e["room"] for e in tr]), len(ROOMS))
        pred = predict(w, (torch.stack([e["x"] for e in te]) - mean) / std)
        for e, p in zip(te, pred.tolist()):
            cell = hits["last" if e["last"] else "earlier"]
            cell[0] += int(p == e["room"])
            cell[1] += 1
    for key, (c, n) in hits.items():
        result[f"probe_{key}"] = c / n if n else None
        result[f"n_{key}"] = n
        asked = [e["model"] for e in test if e["model"] is not None and e["last"] == (key == "last")]
        result[f"model_{key}"] = sum(asked) / len(asked) if asked else None
        result[f"n_model_{key}"] = len(asked)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="+", help="RMT or ARMT run folders trained on babilong:qa1 rows")
    p.add_argument("--rows", type=int, default=2048, help="training-split rows for the probe")
    p.add_argument("--test-rows", type=int, default=1024, help="held-out val-split rows")
    p.add_argument("--context-segments", type=int, default=1,
                   help="segments before the question's (rows of N + 1 segments; 2 probes "
                        "the memory after it took in a second segment)")
    p.add_argument("--babi", default=str(SHARED_DATA / "babi"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="append each JSON row to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    babi = args.babi if Path(args.babi).is_dir() else None
    for run in args.runs:
        row = probe_run(run, args.rows, args.test_rows, babi=babi,
                        context_segments=args.context_segments)
        row["machine"] = machine()
        emit_row(row, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "babilong_memory_probe.py"))
