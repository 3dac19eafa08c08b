"""GMT against the dense GPT at the same depth and width: loss, parameters, speed.

Both models have the same n_layer / d_model / n_head, learned positions and
bias-free attention; the only difference is the sublayer after attention (a
4x GELU MLP for GPT, a graph-memory cell for GMT). Both see the same tokens:
same batch size, window length, steps, learning-rate schedule and data order
(seeded), trained by memlm's one trainer.

Data:
* tiny Shakespeare, character tokenizer, first 90% train / last 10% validation;
* WikiText-2 (raw text), byte tokenizer: train on valid.txt, evaluate on test.txt.

Reported per dataset and architecture: validation loss (nats/token) mean and
spread over seeds, parameter counts, training tokens/s from the trainer's log,
and a paired throughput measurement (the two models' training steps interleaved
in one process, so a busy machine slows both alike) with the ratio GMT/dense.

    python benchmarks/gmt_vs_dense.py            # 3 seeds, 4 x 128, 2000 steps
    python benchmarks/gmt_vs_dense.py --quick    # 2 seeds, 2 x 64, 150 steps
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch
from _common import SHARED_DATA, matmul_peak, print_table, write_json

import memlm
from memlm.config import DataConfig, RunConfig, TrainConfig, model_config_from_dict
from memlm.train.trainer import train

DATASETS = {
    "shakespeare": {"source": "tinyshakespeare/input.txt", "val": None, "tokenizer": "char"},
    "wikitext2": {"source": "wikitext-2/valid.txt", "val": "wikitext-2/test.txt",
                  "tokenizer": "byte"},
}
NO_AUX = {"lambda_track": 0.0, "lambda_ortho": 0.0, "lambda_cluster": 0.0, "lambda_edge": 0.0,
          "lambda_contrast": 0.0}
#: optional GMT ablations (--variants): name -> config changes on top of the GMT defaults
VARIANTS = {
    "gmt_tau1": {"temp_min": 1.0},  # no routing-temperature annealing
    "gmt_no_aux": NO_AUX,  # LM loss only
    "gmt_prob": {"graph_logits": "prob"},  # the reference's additive graph term
    "gmt_faithful": {"faithful": True},  # the reference's behaviour throughout
}


def model_dict(arch: str, args: argparse.Namespace, vocab_size: int = 256) -> dict[str, Any]:
    common = {"arch": arch, "vocab_size": vocab_size, "n_layer": args.n_layer,
              "n_head": args.n_head, "d_model": args.d_model, "context_len": args.seq_len,
              "dropout": 0.0, "pos_emb": "learned"}
    if arch == "gpt":
        return {**common, "bias": False}
    return {**common, "arch": "gmt", "memory_slots": args.slots, "nav_dim": args.nav_dim,
            "maintenance_every": args.maintenance_every, **VARIANTS.get(arch, {})}


def run_config(arch: str, dataset: str, seed: int, args: argparse.Namespace) -> RunConfig:
    spec = DATASETS[dataset]
    return RunConfig(
        model=model_config_from_dict(model_dict(arch, args)),
        train=TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                          min_lr=args.lr / 10, warmup_steps=max(args.steps // 20, 1),
                          beta2=0.99, weight_decay=0.1, grad_clip=1.0,
                          precision=args.precision, eval_every=10**9, save_every=10**9,
                          log_every=max(args.steps // 10, 1), eval_batches=args.eval_batches,
                          seed=seed),
        data=DataConfig(source=str(SHARED_DATA / spec["source"]), tokenizer=spec["tokenizer"],
                        val_source=str(SHARED_DATA / spec["val"]) if spec["val"] else None,
                        val_fraction=0.1, seq_len=args.seq_len, cache_dir=args.cache_dir),
    )


PAIRED = {"gpt": ("gpt", {}), "gmt": ("gmt", {}), "gmt_no_aux": ("gmt", NO_AUX)}


def _train_step(model, opt, ids, step: int, precision: str) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = model(ids[:, :-1], targets=ids[:, 1:])
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()
    with torch.no_grad():
        model.on_train_step_end(step, 10**6)


def _ops_per_step(model, opt, ids, precision: str) -> int:
    """Number of aten operator calls in one training step (forward, backward, update)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _train_step(model, opt, ids, 1, precision)
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def paired_throughput(args: argparse.Namespace, vocab_size: int) -> dict[str, Any]:
    """Training tokens/s of the models, their steps interleaved round by round, so that a
    busy machine slows them alike; plus aten operator calls per training step."""
    models, opts = {}, {}
    for name, (arch, extra) in PAIRED.items():
        torch.manual_seed(0)
        cfg = model_config_from_dict({**model_dict(arch, args, vocab_size), **extra})
        models[name] = memlm.build_from_config(cfg)
        opts[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-3)
    ids = torch.randint(0, vocab_size, (args.batch_size, args.seq_len + 1))
    times: dict[str, list[float]] = {name: [] for name in PAIRED}
    step = 0
    for rnd in range(args.rounds + 1):  # round 0 warms up
        for name in PAIRED:
            t0 = time.perf_counter()
            for _ in range(args.round_steps):
                step += 1
                _train_step(models[name], opts[name], ids, step, args.precision)
            if rnd:
                times[name].append(time.perf_counter() - t0)
    tokens = args.round_steps * args.batch_size * args.seq_len
    out: dict[str, Any] = {}
    for name in PAIRED:
        out[f"{name}_tokens_per_sec"] = tokens / statistics.median(times[name])
        out[f"{name}_ops_per_step"] = _ops_per_step(models[name], opts[name], ids,
                                                    args.precision)
    out["ratio_gmt_over_gpt"] = out["gmt_tokens_per_sec"] / out["gpt_tokens_per_sec"]
    out["ratio_gmt_no_aux_over_gpt"] = (out["gmt_no_aux_tokens_per_sec"]
                                        / out["gpt_tokens_per_sec"])
    return out


def analytic_macs(args: argparse.Namespace) -> dict[str, float]:
    """Forward multiply-adds per token per block of the two sublayers.

    The cell's count at full size: docs/gmt.md#cost-per-token.
    """
    d, k, dn = args.d_model, args.slots, args.nav_dim
    attn = 4 * d * d
    ffn = 8 * d * d
    cell = k * d + d * dn + k * dn + 2 * k * d
    return {"attn_proj": attn, "dense_ffn": ffn, "gmt_cell": cell,
            "block_ratio_gmt_over_gpt": (attn + cell) / (attn + ffn)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 seeds, 2 x 64 model, 150 steps")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--nav-dim", type=int, default=32)
    ap.add_argument("--maintenance-every", type=int, default=110)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-batches", type=int, default=40)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--datasets", default="shakespeare,wikitext2")
    ap.add_argument("--rounds", type=int, default=5, help="paired-throughput rounds")
    ap.add_argument("--round-steps", type=int, default=10)
    ap.add_argument("--variants", default="",
                    help=f"extra GMT ablations to train, comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--throughput-only", action="store_true",
                    help="skip the training runs; only the paired throughput measurement")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.steps, args.n_layer, args.d_model = 2, 150, 2, 64
        args.slots, args.nav_dim, args.maintenance_every = 16, 16, 50
        args.batch_size, args.eval_batches, args.rounds = 16, 10, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    archs = ["gpt", "gmt"] + [v.strip() for v in args.variants.split(",") if v.strip()]
    for name in archs[2:]:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; choose from {sorted(VARIANTS)}")
    for name in datasets:
        if name not in DATASETS:
            raise SystemExit(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
        if not (SHARED_DATA / DATASETS[name]["source"]).exists():
            print(f"skipped: {SHARED_DATA / DATASETS[name]['source']} is absent")
            return 0

    runs, rows = [], []
    for dataset in [] if args.throughput_only else datasets:
        per_arch: dict[str, list[dict[str, Any]]] = {arch: [] for arch in archs}
        for seed in range(args.seeds):
            for arch in archs:  # interleaved: load changes hit every model alike
                cfg = run_config(arch, dataset, 1000 + seed, args)
                t0 = time.perf_counter()
                res = train(cfg, None, progress=sys.stderr.isatty())
                train_tps = [r["tokens_per_sec"] for r in res.history if r.get("kind") == "train"]
                record = {
                    "dataset": dataset, "arch": arch, "seed": 1000 + seed,
                    "val_loss": res.final["nll"], "val_tokens": res.final["tokens"],
                    "tokens_seen": args.steps * args.batch_size * args.seq_len,
                    "tokens_per_sec": statistics.median(train_tps[1:] or train_tps),
                    "wall_s": time.perf_counter() - t0,
                    "params": res.model.num_params(),
                    "params_non_embedding": res.model.num_params(non_embedding=True),
                }
                if arch != "gpt":
                    diags = res.model.memory_diagnostics()
                    record["gmt_dead_slots"] = sum(d["dead"] for d in diags)
                    record["gmt_n_eff_mean"] = statistics.mean(d["n_eff"] for d in diags)
                    record["gmt_edge_ent_mean"] = statistics.mean(d["edge_ent"] for d in diags)
                per_arch[arch].append(record)
                runs.append(record)
                print(f"{dataset} {arch} seed {record['seed']}: val {record['val_loss']:.4f} "
                      f"{record['tokens_per_sec']:,.0f} tok/s", flush=True)
        for arch, recs in per_arch.items():
            losses = [r["val_loss"] for r in recs]
            rows.append({
                "dataset": dataset, "arch": arch,
                "val_loss_mean": statistics.mean(losses),
                "val_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                "val_loss_range": max(losses) - min(losses),
                "params": recs[0]["params"], "non_emb_params": recs[0]["params_non_embedding"],
                "tokens_seen": recs[0]["tokens_seen"],
                "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in recs),
            })
        gpt_row = rows[-len(archs)]
        for row in rows[-len(archs) + 1:]:
            row["tps_ratio_vs_gpt"] = row["tokens_per_sec"] / gpt_row["tokens_per_sec"]

    print()
    table = "" if not rows else print_table(rows, ["dataset", "arch", "val_loss_mean", "val_loss_std",
                               "val_loss_range", "params", "non_emb_params", "tokens_seen",
                               "tokens_per_sec", "tps_ratio_vs_gpt"])
    paired = paired_throughput(args, vocab_size=256)
    macs = analytic_macs(args)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = matmul_peak(dtype, n=512, seconds=0.5)
    print(f"\npaired throughput (interleaved steps, B={args.batch_size}, T={args.seq_len}):")
    print_table([{"model": name, "tokens_per_sec": paired[f"{name}_tokens_per_sec"],
                  "ratio_vs_gpt": paired[f"{name}_tokens_per_sec"]
                  / paired["gpt_tokens_per_sec"],
                  "aten_ops_per_step": paired[f"{name}_ops_per_step"]} for name in PAIRED],
                ["model", "tokens_per_sec", "ratio_vs_gpt", "aten_ops_per_step"])
    print(f"forward MACs per token per block: attention projections {macs['attn_proj']:,}, "
          f"dense FFN {macs['dense_ffn']:,}, GMT cell {macs['gmt_cell']:,} "
          f"(block ratio GMT/GPT {macs['block_ratio_gmt_over_gpt']:.2f}); "
          f"measured {args.precision} matmul peak {peak / 1e9:.1f} GFLOP/s")
    name = "gmt_vs_dense_throughput" if args.throughput_only else "gmt_vs_dense"
    name += f"_{args.tag}" if args.tag else ""
    write_json(name, {"args": vars(args), "summary": rows, "runs": runs,
                                "paired_throughput": paired, "analytic_macs": macs,
                                "matmul_peak_flops": peak, "table": table})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
