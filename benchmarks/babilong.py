"""BABILong qa1 recipe (and qa2-qa5 with it): tiny ARMT and RMT against a dense GPT with
the same window.

The recipe (docs/babilong.md, "The recipe", "Round 7", "Round 11" and "Round 12"): word
tokens, facts hidden in memlm's filler, memlm's protocol (the question starts the last
segment, 64 tokens for RMT and 32 for ARMT, so a 2-segment sample already needs memory),
the backbone stage `gpt-babi-qa1`, then `rmt-babilong-qa1` (2 segments, then rows of 2..6
segments), the dense baseline `gpt-babilong-qa1` and ARMT's `armt-babilong-qa1` (2
segments, then rows of 2..3, 2..4, 2..8 and 2..16, then 2..16 rows on memories that have
read a long filler stream first: "Round 12") from it.
Every model answers held-out bAbI *test* questions at each length, on the filler and
on real text (WikiText-2), by greedy generation and exact match.
ARMT is also scored with its memory reset before every segment (the control that
proves the memory does the work), and its accuracy per depth of the supporting
fact gives the length x depth heat map.

    python benchmarks/babilong.py --full                       # train + evaluate
    python benchmarks/babilong.py --full --seeds 0,1,2 --archs armt,gpt,rmt
    python benchmarks/babilong.py --eval-only armt:0=runs/armt-qa1-s0 gpt:0=runs/gpt-qa1-s0
    python benchmarks/babilong.py --quick                      # minutes: plumbing check
    python benchmarks/babilong.py --stability runs/armt-qa1-s0 # 2,000 segments of WikiText
    python benchmarks/babilong.py --full --tasks qa2-qa5 --archs rmt --seeds 0

`--tasks` runs the same recipe per task: the task replaces qa1 in both presets' data
sources (backbone `babi:qaN`, then `babilong:qaN:...` from that task's backbone), each
task has its own backbone run (gpt-babi-qaN) and model runs ({arch}-qaN-s{seed}), is
evaluated on its own test questions and its rows say "task": "qaN". qa1 keeps its names.

Writes benchmarks/results/babilong_recipe.json: one row per measurement,
{"model", "seed", "task", "length", "background", "accuracy", "n"} (accuracy in
0..1), plus the length table (model tokens and GPT-2 tokens), the heat maps and
the command. Without bAbI files it falls back to the synthetic qa1 stand-in.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, print_table, run_cli, write_json  # noqa: E402

from memlm.config import load_run_config
from memlm.data.babi import find_task_file
from memlm.data.babilong import BabilongBuilder, expand_tasks
from memlm.data.background import load_background
from memlm.errors import ConfigError
from memlm.eval.babilong import evaluate_babilong, gpt2_lengths
from memlm.models.streaming import segment_length
from memlm.specs import length_name, parse_lengths
from memlm.train.run import resolve_model_dir

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"armt": "armt-babilong-qa1", "rmt": "rmt-babilong-qa1", "gpt": "gpt-babilong-qa1"}
#: the backbone stage: a GPT trained on bAbI stories, which presets with `train.init_from`
#: start from (one backbone for every seed, as the papers fine-tune one pretrained GPT-2)
BACKBONE = "gpt-babi-qa1"
#: where results files and heat maps go (tests point it at a temporary folder)
RESULTS_DIR = Path(__file__).parent / "results"


def backbone_name(task: str = "qa1") -> str:
    """The backbone stage's run name for `task` (qa1 and its stand-in: `BACKBONE`)."""
    return BACKBONE if task in ("qa1", "synth-qa1") else f"gpt-babi-{task}"


def run_name(arch: str, seed: int, task: str = "qa1") -> str:
    """A model run's name: `{arch}-qa1-s{seed}` for qa1 (and its stand-in), else the task's."""
    return f"{arch}-{'qa1' if task == 'synth-qa1' else task}-s{seed}"


def preset_config(arch: str, seed: int, steps_scale: float = 1.0, babi: str | None = None,
                  backbone: Path | None = None, task: str = "qa1"):
    """The recipe's RunConfig for one model, seed and bAbI task; `backbone` replaces the
    preset's `train.init_from` (the backbone stage's run folder). Another task than qa1
    only swaps the task in the data source ("the same recipe"): every other setting,
    the story-length curriculum included, stays the qa1 preset's."""
    if task not in ("qa1", "synth-qa1") and not babi:
        raise ConfigError(f"task {task} needs the bAbI files (--babi DIR); only qa1 has a "
                          "built-in stand-in (synth-qa1)")
    name = BACKBONE if arch == "backbone" else PRESETS[arch]
    cfg = load_run_config(ROOT / "memlm" / "configs" / f"{name}.yaml")
    d = cfg.to_dict()
    d["train"]["seed"] = seed
    if d["train"].get("init_from") and backbone is not None:
        d["train"]["init_from"] = str(backbone)
    if steps_scale != 1.0:
        for st in d["train"]["curriculum"]:
            st["steps"] = max(2, int(st["steps"] * steps_scale))
        d["train"]["max_steps"] = (sum(st["steps"] for st in d["train"]["curriculum"])
                                   or max(2, int(d["train"]["max_steps"] * steps_scale)))
        d["train"]["warmup_steps"] = min(d["train"]["warmup_steps"], d["train"]["max_steps"] // 4)
        d["train"]["eval_every"] = d["train"]["save_every"] = 10**9
    source = d["data"]["source"]
    if source.startswith("babi:"):  # the backbone's stories
        d["data"]["source"] = f"babi:{task if babi else 'synth-qa1'}"
        d["data"]["source"] += f":dir={babi}" if babi else ""
    elif babi:
        d["data"]["source"] = source.replace("babilong:qa1", f"babilong:{task}", 1)
        d["data"]["source"] += f":babi={babi}"
    else:  # no bAbI files: the synthetic stand-in
        d["data"]["source"] = source.replace("babilong:qa1", "babilong:synth-qa1", 1)
    return type(cfg).from_dict(d)


def train_one(arch: str, seed: int, args: argparse.Namespace, babi: str | None,
              backbone: Path | None = None, task: str = "qa1") -> Path:
    from memlm.train.trainer import train

    name = backbone_name(task) if arch == "backbone" else run_name(arch, seed, task)
    out = Path(args.runs) / name
    cfg = preset_config(arch, seed, args.steps_scale, babi, backbone, task)
    t0 = time.perf_counter()
    train(cfg, out_dir=out, progress=not args.no_progress, overwrite=True)
    print(f"trained {name} in {time.perf_counter() - t0:.0f} s -> {out}")
    return out


def set_read_cap(model, cap: float | None) -> None:
    """Override a loaded ARMT's read cap (an evaluation-time experiment: how a cap changes
    a model trained without one); the config records it so results say what ran."""
    if getattr(model.config, "arch", None) != "armt":
        return
    model.config.read_cap = cap
    for layer in model.backbone.layers():
        layer.memory.read_cap = cap


def load_for_eval(run: Path | str, args: argparse.Namespace):
    from memlm.train.run import load_run

    model, tok = load_run(run)
    if args.read_cap is not None:
        set_read_cap(model, None if args.read_cap <= 0 else args.read_cap)
    return model, tok


def check_segment_fit(tok, task: str, babi: str | None, segment: int, run: str) -> None:
    """Refuse (one line) a task whose longest test question + marker + answer + eos does
    not fit one segment: memlm's protocol puts all of it in the final segment, and a
    longer one would stop the evaluation with a traceback after the runs before it."""
    builder = BabilongBuilder(tok, load_background(None, tok, seed=0), seed=0, babi_dir=babi)
    longest = max(builder.tail_len(q) for q in builder.questions(task, "test"))
    if longest > segment:
        raise ConfigError(f"{run}: the longest {task} test question + marker + answer + eos "
                          f"takes {longest} tokens, more than its segment of {segment}")


def task_info(args: argparse.Namespace) -> int:
    """What "the same recipe" means for each task, before any training: which bAbI file
    its train stories come from, how many questions each split has, the longest question
    + marker + answer + eos against the 64-token segment, the answer vocabulary (chance =
    one over its size), and how many train questions each curriculum stage of
    `rmt-babilong-qa1` may draw (its data source's own eligibility: at most 5 story lines
    per context segment, and the facts must fit the context)."""
    from memlm.data.babi import TASK_LABELS
    from memlm.data.babilong import babilong_source
    from memlm.data.tokenizers import make_tokenizer

    babi = args.babi if Path(args.babi).is_dir() else None
    if babi is None:
        raise ConfigError(f"--task-info reads the bAbI files; none at {args.babi}")
    tok = make_tokenizer(f"word:512:{babi}")
    cfg = load_run_config(ROOT / "memlm" / "configs" / f"{PRESETS['rmt']}.yaml")
    stages = [st["seq_len"] for st in cfg.to_dict()["train"]["curriculum"]]
    builder = BabilongBuilder(tok, load_background(None, tok, seed=0), seed=0, babi_dir=babi)
    out = []
    for task in expand_tasks(args.tasks or "qa1-qa5"):
        train_file = find_task_file(task, "train", babi)
        row = {"task": task, "train_file": f"{train_file.parent.name}/{train_file.name}",
               "answers": len(TASK_LABELS[task]),
               "chance_%": round(100 / len(TASK_LABELS[task]), 1)}
        for split in ("train", "val", "test"):
            row[split] = len(builder.questions(task, split))
        row["max_tail"] = max(builder.tail_len(q) for split in ("train", "val", "test")
                              for q in builder.questions(task, split))
        row["max_lines"] = max(len(q.facts) + 1 for q in builder.questions(task, "test"))
        spec = cfg.data.source.replace("babilong:qa1", f"babilong:{task}", 1) + f":babi={babi}"
        for seq_len in stages:
            src = babilong_source(spec, tokenizer=tok, batch_size=1, seq_len=seq_len, seed=0,
                                  split="train")
            # the source's own list of the questions a row of this length may ask
            row[f"n@{seq_len}"] = len(src._eligible[task, src.C])
        out.append(row)
    print("bAbI tasks under the qa1 recipe (rmt-babilong-qa1's curriculum; n@L: train "
          "questions a row of L tokens may ask)")
    print_table(out, list(out[0]))
    return 0


def source_tasks(run: Path) -> list[str] | None:
    """The bAbI tasks a run was trained on, from its run.yaml's data.source (`babi:` or
    `babilong:` sources); None when the folder has no run.yaml or another source."""
    from memlm.train.run import RUN_CONFIG

    if not (run / RUN_CONFIG).is_file():
        return None
    source = load_run_config(run / RUN_CONFIG).data.source or ""
    head, _, rest = source.partition(":")
    first = rest.split(":")[0]
    if head not in ("babi", "babilong") or not first or "=" in first:
        return None
    return ["qa1" if t == "synth-qa1" else t for t in expand_tasks(first)]


def eval_task(run: Path, wanted: list[str] | None) -> str:
    """Which task an --eval-only run is scored on: the one its data.source names (which
    --tasks, when given, must include), else the one task --tasks names (default qa1)."""
    own = source_tasks(run)
    if own is not None and len(own) == 1:
        if wanted is not None and own[0] not in wanted:
            raise ConfigError(f"{run} was trained on {own[0]} but --tasks asks for "
                              f"{','.join(wanted)}; leave --tasks out to score it on {own[0]}")
        return own[0]
    pool = [t for t in (wanted or ["qa1"]) if own is None or t in own]
    if len(pool) != 1:
        raise ConfigError(f"cannot tell which task to score {run} on (trained on "
                          f"{','.join(own) if own else 'no single bAbI task'}); "
                          "pass --tasks with exactly one of its tasks")
    return pool[0]


def evaluate_run(name: str, seed: int, run: Path, model, tok, args: argparse.Namespace,
                 babi: str | None, task: str, backgrounds: dict[str, str | None]
                 ) -> tuple[list[dict], dict]:
    """Score one run folder, whose (model, tokenizer) the caller loaded (`load_for_eval`)."""
    rows, extra = [], {"run": str(run), "params": model.num_params(), "tables": {},
                       "read_cap": getattr(model.config, "read_cap", None)}
    controls = [False, True] if model.is_stateful and not args.no_control else [False]
    if args.control_only:
        controls = [True] if model.is_stateful else []
    for bg_name, bg in backgrounds.items():
        background = load_background(bg, tok, seed=0, cache_dir=args.cache_dir)
        builder = BabilongBuilder(tok, background, seed=0, babi_dir=babi)
        for reset in controls:
            label = name + (" (memory reset)" if reset else "")
            t0 = time.perf_counter()
            table = evaluate_babilong(model, tok, task, args.lengths, n_samples=args.n_samples,
                                      builder=builder, batch_size=args.eval_batch_size,
                                      reset_memory=reset, mode="generate")
            print(table)
            print(f"[{label} seed {seed} {bg_name}] {time.perf_counter() - t0:.0f} s")
            extra["tables"][f"{label}|{bg_name}"] = table.to_dict()
            for r in table.rows:
                rows.append({"model": label, "seed": seed, "task": r.task,
                             "length": length_name(r.length), "background": bg_name,
                             "accuracy": r.correct / max(r.n_evaluated, 1), "n": r.n_evaluated})
    return rows, extra


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and the 95% t-interval half-width over seeds (None with one seed)."""
    t95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78}
    m = float(np.mean(values))
    if len(values) < 2:
        return m, None
    return m, t95.get(len(values), 2.0) * float(np.std(values, ddof=1)) / math.sqrt(len(values))


def summary(rows: list[dict], lengths: list[int]) -> tuple[str, list[dict]]:
    """Task x length x model table: mean +- CI over seeds (Wilson 95% for one seed)."""
    keys = list(dict.fromkeys((r["model"], r["task"], r["background"]) for r in rows))
    out = []
    for model, task, bg in keys:
        line = {"model": model, "task": task, "background": bg}
        seeds = sorted({r["seed"] for r in rows
                        if (r["model"], r["task"], r["background"]) == (model, task, bg)})
        line["seeds"] = ",".join(map(str, seeds))
        for n in lengths:
            cell = [r for r in rows if (r["model"], r["task"], r["background"]) == (model, task, bg)
                    and r["length"] == length_name(n)]
            if not cell:
                continue
            m, ci = mean_ci([c["accuracy"] for c in cell])
            if ci is None:  # one seed: binomial (Wilson) interval over the questions
                k, N = cell[0]["accuracy"] * cell[0]["n"], cell[0]["n"]
                z = 1.96
                centre = (k + z * z / 2) / (N + z * z)
                ci = z * math.sqrt(k * (N - k) / N + z * z / 4) / (N + z * z)
                m_txt = f"{100 * m:.0f} [{100 * (centre - ci):.0f}-{100 * (centre + ci):.0f}]w"
            else:
                m_txt = f"{100 * m:.0f}+-{100 * ci:.0f}"
            line[length_name(n)] = m_txt
        out.append(line)
    text = print_table(out, ["task", "model", "background", "seeds"]
                       + [length_name(n) for n in lengths])
    return text, out


def length_table(tok, babi: str | None, tasks: list[str], lengths: list[int],
                 backgrounds: dict[str, str | None], cache_dir: str | None) -> list[dict]:
    """Each named length in the model's tokens and (estimated) GPT-2 tokens, per task."""
    out = []
    for task in tasks:
        for bg_name, bg in backgrounds.items():
            g = gpt2_lengths(tok, bg, task, lengths, babi_dir=babi, cache_dir=cache_dir)
            for n in lengths:
                out.append({"task": task, "background": bg_name, "length": length_name(n),
                            **g[n]})
    return out


def heatmaps(extra: dict[str, Any], path: Path) -> dict[str, Any]:
    """Accuracy per (length, depth decile of the deepest supporting fact), per table."""
    maps = {}
    for key, table in extra.items():
        grid = {}
        for r in table["rows"]:
            if r["length"] == 0:
                continue
            grid[r["length_name"]] = [None if n == 0 else c / n
                                      for n, c in zip(r["depth_n"], r["depth_correct"])]
        maps[key] = grid
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return maps
    keys = [k for k in maps if maps[k]]
    if not keys:
        return maps
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        grid = maps[key]
        names = list(grid)
        data = np.array([[np.nan if v is None else v for v in grid[n]] for n in names])
        im = ax.imshow(data.T, vmin=0, vmax=1, origin="lower", aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(names)), names)
        ax.set_yticks(range(10), [f"{10 * i}%" for i in range(10)])
        ax.set_xlabel("length")
        ax.set_ylabel("depth of the supporting fact")
        ax.set_title(key.replace("|", "\n"), fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")
    return maps


def recency(tables: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Accuracy by how many statements follow the last supporting one (0, 1, 2+), per table,
    pooled over its lengths. A model that answers with the most recent statement scores
    high in the first column only: qa1's shortcut, which a model can learn long before it
    learns to look up the person asked about (docs/babilong.md)."""
    out, lines = {}, ["accuracy by statements after the supporting one (0 | 1 | 2+), all lengths:"]
    for key, table in tables.items():
        n = np.zeros(3, int)
        c = np.zeros(3, int)
        for r in table["rows"]:
            if "recency_n" in r:  # rows written before this split was recorded have none
                n += r["recency_n"]
                c += r["recency_correct"]
        if not n.sum():
            continue
        out[key] = {"n": n.tolist(), "correct": c.tolist()}
        cells = " | ".join(f"{100 * ci / ni:.0f}% of {ni}" if ni else "-" for ci, ni in zip(c, n))
        lines.append(f"  {key}: {cells}")
    return "\n".join(lines), out


def stability(run: str, args: argparse.Namespace) -> int:
    """Stream 2,000 segments of WikiText-2 through a trained ARMT, with the capacity bound
    on and off: memory norms, read share, loss and how degenerate the predictions are."""
    wiki = SHARED_DATA / "wikitext-2" / "test.txt"
    if not wiki.exists():
        print(f"no WikiText-2 at {wiki}; skipped")
        return 0
    model, tok = load_for_eval(run, args)
    ids = torch.tensor(tok.encode(wiki.read_text()), dtype=torch.long)
    L = model.config.segment_len
    n_seg = min(args.segments, len(ids) // L)
    results = {}
    for cap in (model.config.mem_capacity, None):
        for layer in model.backbone.layers():
            layer.memory.capacity = cap
        model.eval()
        state, log = model.init_state(1), []
        with torch.no_grad():
            for s in range(n_seg):
                x = ids[s * L:(s + 1) * L][None]
                y = ids[s * L + 1:(s + 1) * L + 1][None]
                out = model(x[:, : y.shape[1]], targets=y, state=state)
                state = out.state
                if s % 50 == 49 or s == n_seg - 1:
                    pred = out.logits.argmax(-1)[0]
                    top = torch.bincount(pred).max().item() / len(pred)
                    log.append({
                        "segment": s + 1, "loss": float(out.loss),
                        "a_norm": max(float(m.A.norm()) for m in state.layers),
                        "z_sum": max(float(m.z.sum()) for m in state.layers),
                        "read_share": float(out.metrics.get("armt_read_share", float("nan"))),
                        "finite": all(bool(torch.isfinite(m.A).all()) for m in state.layers),
                        "top_token_share": top})
        results[str(cap)] = log
        first, last = log[0], log[-1]
        print(f"capacity {cap}: after {first['segment']} segments a_norm {first['a_norm']:.3g} "
              f"z_sum {first['z_sum']:.3g} loss {first['loss']:.3f}; after {last['segment']}: "
              f"a_norm {last['a_norm']:.3g} z_sum {last['z_sum']:.3g} loss {last['loss']:.3f} "
              f"top-token share {last['top_token_share']:.2f} finite {last['finite']}; read share "
              + " ".join(f"{r['segment']}:{r['read_share']:.2f}" for r in log
                         if r["segment"] in (50, 100, 500, 1000, 2000)))
    write_json(args.name + "_stability", {"command": _command(), "run": run, "segments": n_seg,
                                          "segment_len": L, "results": results})
    return 0


def merge(args: argparse.Namespace) -> int:
    """One results file from several written in parallel (rows, runs and commands joined;
    the summary table and heat maps recomputed)."""
    import json

    rows, extras, commands, lengths, tasks = [], {}, [], [], []
    for name in args.merge:
        data = json.loads((RESULTS_DIR / f"{name}.json").read_text())
        rows += data["rows"]
        for key, extra in data.get("runs_full", {}).items():
            if key not in extras:
                extras[key] = extra
                continue
            for tkey, table in extra["tables"].items():
                mine = extras[key]["tables"].setdefault(tkey, table)
                if mine is not table:  # the same model measured at other lengths in another part
                    have = {r["length_name"] for r in mine["rows"]}
                    mine["rows"] += [r for r in table["rows"] if r["length_name"] not in have]
                    mine["by_length"] = {**table["by_length"], **mine["by_length"]}
        commands += data.get("commands", [data.get("command")])
        lengths = lengths or data.get("lengths", [])
        tasks += data.get("task", "qa1").split(",")
    for item in args.rename:
        head, _, new = item.partition("=")
        model, _, seed = head.partition(":")
        for r in rows:
            base, sep, rest = r["model"].partition(" (")
            if base == model and r["seed"] == int(seed):
                r["model"] = new + sep + rest
        for key in [k for k in extras if k.split(":")[:2] == [model, seed]]:
            extras[new + key[len(model):]] = extras.pop(key)  # keeps a ":qaN" tail
    seen: dict[tuple, int] = {}
    for r in rows:
        k = (r["model"], r["seed"], r["task"], r["background"], r["length"])
        seen[k] = seen.get(k, 0) + 1
    twice = [k for k, n in seen.items() if n > 1]
    if twice:  # e.g. a part merged into babilong_recipe a second time
        m, seed, task, bg, length = twice[0]
        raise ConfigError(f"--merge: {len(twice)} rows occur more than once, the first "
                          f"{m} seed {seed} {task} {bg} {length}; merge each part once, or "
                          "--rename one of them (e.g. armt:0=armt-rerun)")
    names = list(dict.fromkeys(r["length"] for r in rows))
    write_results(args.name, ",".join(dict.fromkeys(tasks)), rows, parse_lengths(",".join(names)), lengths, extras,
                  commands)
    return 0


def write_results(name: str, task: str, rows: list[dict], eval_lengths: list[int],
                  lengths: list[dict], extras: dict[str, Any], commands: list[str]) -> None:
    """The summary table, heat maps and `benchmarks/results/NAME.json` for a set of rows."""
    text, table = summary(rows, eval_lengths)
    all_tables = {f"{k}|{t}": v for k, e in extras.items() for t, v in e["tables"].items()}
    maps = heatmaps(all_tables, RESULTS_DIR / f"{name}_heatmap.png")
    recency_text, by_recency = recency(all_tables)
    print(recency_text)
    write_json(name, {"command": " && ".join(commands), "commands": commands, "task": task,
                      "rows": rows, "table": text, "summary": table, "lengths": lengths,
                      "heatmaps": maps, "recency": by_recency, "runs_full": extras})


def _command() -> str:
    return " ".join(["python", "benchmarks/babilong.py", *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--full", action="store_true", help="train every model and seed, evaluate")
    mode.add_argument("--quick", action="store_true", help="2%% of the steps, 6 questions")
    mode.add_argument("--eval-only", nargs="+", metavar="ARCH:SEED=RUN",
                      help="evaluate existing run folders")
    mode.add_argument("--stability", metavar="RUN", help="2,000 segments of WikiText-2")
    mode.add_argument("--task-info", action="store_true",
                      help="per task: bAbI file, question counts, fit, chance, stage sizes")
    mode.add_argument("--merge", nargs="+", metavar="NAME",
                      help="merge results files written in parallel into --name")
    p.add_argument("--tasks", default=None,
                   help="bAbI tasks, e.g. qa2 or qa2-qa5 or qa1,qa3 (default qa1; with "
                        "--eval-only each run's own task, read from its data.source)")
    p.add_argument("--archs", default="armt,gpt,rmt")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--babi", default=str(SHARED_DATA / "babi"))
    p.add_argument("--wikitext", default=str(SHARED_DATA / "wikitext-2"),
                   help="real-text background folder (skipped when absent)")
    p.add_argument("--lengths", default=None, help="default 0k,1k,4k,16k,64k (--quick: 0k,1k,4k)")
    p.add_argument("--steps-scale", type=float, default=None,
                   help="share of the presets' steps to train (default 1; --quick 0.02)")
    p.add_argument("--n-samples", type=int, default=100)
    p.add_argument("--eval-batch-size", type=int, default=25)
    p.add_argument("--no-control", action="store_true", help="skip the memory-reset control")
    p.add_argument("--control-only", action="store_true", help="only the memory-reset control")
    p.add_argument("--backgrounds", default="filler,wikitext-2", help="which backgrounds")
    p.add_argument("--runs", default="runs/babilong")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--segments", type=int, default=2000)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--read-cap", type=float, default=None,
                   help="evaluate ARMT runs with this read cap (0: none) instead of their own")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--name", default="babilong_recipe")
    p.add_argument("--rename", nargs="*", default=[], metavar="MODEL:SEED=NEW",
                   help="with --merge: label one model's seed differently (e.g. a run stopped "
                        "early), so it is not averaged with fully trained seeds")
    p.add_argument("--append", action="store_true",
                   help="merge into an existing results file (re-evaluated runs replace theirs)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stability:
        return stability(args.stability, args)
    if args.merge:
        return merge(args)
    if args.task_info:
        return task_info(args)
    if args.quick:
        args.n_samples = min(args.n_samples, 6)
        args.name = args.name if args.name != "babilong_recipe" else "babilong_quick"
    args.lengths = parse_lengths(args.lengths or ("0k,1k,4k" if args.quick else "0k,1k,4k,16k,64k"))
    if args.steps_scale is None:
        args.steps_scale = 0.02 if args.quick else 1.0
    if not 0 < args.steps_scale <= 1:
        raise ConfigError(f"--steps-scale must be in (0, 1], got {args.steps_scale}")
    wanted_tasks = None if args.tasks is None else expand_tasks(args.tasks)
    babi = args.babi if Path(args.babi).is_dir() else None
    if babi is None:
        print(f"no bAbI folder at {args.babi}: using the synthetic qa1 stand-in (synth-qa1)")
    for t in wanted_tasks or []:
        if t != "qa1" and babi is None:
            raise ConfigError(f"task {t} needs the bAbI files; none at {args.babi} (pass --babi "
                              "DIR); only qa1 has a built-in stand-in")
        if babi is not None:  # a task this bAbI folder lacks: one line now, not after training
            find_task_file(t, "train", babi)
            find_task_file(t, "test", babi)
    backgrounds: dict[str, str | None] = {"filler": None}
    if Path(args.wikitext).is_dir():
        backgrounds["wikitext-2"] = args.wikitext
    else:
        print(f"no real-text background at {args.wikitext}: filler only")
    wanted = args.backgrounds.split(",")
    backgrounds = {k: v for k, v in backgrounds.items() if k in wanted}

    def family(task: str) -> str:  # qa1 is scored on its stand-in without bAbI files
        return task if task != "qa1" or babi else "synth-qa1"

    runs: list[tuple[str, int, Path, str]] = []
    loaded: dict[Path, tuple] = {}  # each run's (model, tokenizer), loaded once

    def load(run: Path) -> tuple:
        if run not in loaded:
            loaded[run] = load_for_eval(run, args)
        return loaded[run]

    if args.eval_only:
        for item in args.eval_only:
            arch, seed, run = parse_eval_item(item)
            runs.append((arch, seed, run, family(eval_task(run, wanted_tasks))))
        for _arch, _seed, run, task in runs:  # every run checked before the first evaluation
            model, tok = load(run)
            if model.is_stateful and task != "synth-qa1":
                check_segment_fit(tok, task, babi, segment_length(model), str(run))
    else:
        archs = args.archs.split(",")
        bad = [a for a in archs if a not in PRESETS]
        if bad:
            raise ConfigError(f"--archs: unknown {','.join(bad)} (choose from "
                              f"{','.join(PRESETS)})")
        presets = {a: load_run_config(ROOT / "memlm" / "configs" / f"{PRESETS[a]}.yaml")
                   for a in archs}
        needs = [a for a in archs if presets[a].train.init_from]
        seeds = [int(s) for s in args.seeds.split(",")]
        for task in [family(t) for t in (wanted_tasks or ["qa1"])]:
            backbone = train_one("backbone", 0, args, babi, task=task) if needs else None
            if backbone is not None and task != "synth-qa1":
                tok = load(backbone)[1]
                for arch in archs:
                    if presets[arch].model.segment_len:
                        check_segment_fit(tok, task, babi, presets[arch].model.segment_len,
                                          PRESETS[arch])
            for seed in seeds:
                for arch in archs:
                    runs.append((arch, seed, train_one(arch, seed, args, babi, backbone, task),
                                 task))
    run_tasks = list(dict.fromkeys(t for *_, t in runs))
    tasks = run_tasks

    def key(arch: str, seed: int, task: str) -> str:  # qa1's keys as before
        return f"{arch}:{seed}" if task in ("qa1", "synth-qa1") else f"{arch}:{seed}:{task}"

    rows, extras, commands = [], {}, [_command()]
    results_file = RESULTS_DIR / f"{args.name}.json"
    if args.append and results_file.exists():  # keep earlier runs' rows, replace re-run ones
        import json

        old = json.loads(results_file.read_text())
        redo = {(a, s, t) for a, s, _, t in runs}
        rows = [r for r in old["rows"]
                if (r["model"].split(" (")[0], r["seed"], r["task"]) not in redo]
        old_task = old.get("task", "qa1")
        extras = {k: v for k, v in old.get("runs_full", {}).items()
                  if (k.split(":")[0], int(k.split(":")[1]),
                      (k.split(":") + [old_task])[2]) not in redo}
        commands = old.get("commands", [old.get("command")]) + commands
        tasks = list(dict.fromkeys(old_task.split(",") + tasks))
    for arch, seed, run, task in runs:
        r, extra = evaluate_run(arch, seed, run, *load(run), args, babi, task, backgrounds)
        rows += r
        extras[key(arch, seed, task)] = extra
    tok = load(runs[0][2])[1]
    lengths = length_table(tok, babi, run_tasks, args.lengths, backgrounds, args.cache_dir)
    print("\nNamed lengths in model tokens and GPT-2 tokens (mean prompt, estimated):")
    print_table(lengths, ["task", "background", "length", "model_tokens", "gpt2_tokens",
                          "gpt2_per_token"])
    print(f"\nBABILong {','.join(tasks)} exact match (%), {args.n_samples} test questions per "
          "cell; mean+-95% CI over seeds ('[lo-hi]w': one seed, 95% Wilson interval over "
          "questions)")
    write_results(args.name, ",".join(tasks), rows, args.lengths, lengths, extras, commands)
    return 0


def parse_eval_item(item: str) -> tuple[str, int, Path]:
    """'ARCH:SEED=RUN' -> (arch, seed, run folder), checked before any evaluation starts:
    a typo found after an hour of evaluating other runs would cost that hour."""
    head, eq, path = item.partition("=")
    arch, _, seed = head.partition(":")
    if not eq or not arch or not path or not (seed or "0").isdigit():
        raise ConfigError(f"--eval-only takes ARCH:SEED=RUN (e.g. rmt:0=runs/rmt-qa1-s0), "
                          f"got {item!r}")
    resolve_model_dir(path)  # a missing or unreadable run folder: one line, now
    return arch, int(seed or 0), Path(path)


def cli(argv: list[str] | None = None) -> int:
    """`main` with memlm's bad-input rule: one line naming the problem, exit status 2."""
    return run_cli(main, "babilong.py", argv)


if __name__ == "__main__":
    raise SystemExit(cli())
