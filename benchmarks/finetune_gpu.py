"""Issue 19, GPU bullet: memlm's ARMT around a GPT-2-small-shaped transformers model against
the original ARMT code at the same shape: tokens/s and peak GPU memory over a few hundred
steps of the BABILong segment curriculum (2 -> 3 -> 5 segments of 512 tokens, 10 memory
tokens, d_mem 64, AdamW lr 1e-4, bf16 autocast, full BPTT), both from random
initialisation (no pretrained weights are needed: speed and memory do not depend on them).

One implementation per process, because the original code needs transformers 4.x (it
calls GPT-2 blocks with keywords and reads tuple outputs; see tools/parity_fixtures.py):

    python benchmarks/finetune_gpu.py --impl memlm --json out/memlm.json
    pip install --target /tmp/tf440 transformers==4.40.2
    PYTHONPATH=/tmp/tf440 python benchmarks/finetune_gpu.py --impl original \
        --repo /path/to/associative-recurrent-memory-transformer --json out/original.json

Token ids are random (uniform over GPT-2's vocabulary) and every token is scored, so both
sides do exactly the same work; with --babi DIR and --bpe DIR memlm's side can instead read
real BABILong samples (`--data babilong`), which changes only what is learned. Written for
one CUDA GPU; on a CPU it runs (with --steps small) but its numbers mean nothing. Not run
in the session that wrote it (no GPU was lent): docs/finetune.md says so.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import types
from pathlib import Path

import torch

SEGMENT, MEM, D_MEM = 512, 10, 64


def curriculum(stages: str, steps: int) -> list[int]:
    """Segments per sample for each step: `steps` split evenly over the stages."""
    counts = [int(x) for x in stages.split(",")]
    per = max(1, steps // len(counts))
    plan = [n for n in counts for _ in range(per)][:steps]
    return plan + [counts[-1]] * (steps - len(plan))  # the remainder goes to the last stage


#: --tiny: a CPU smoke-test shape (the script's plumbing, not a measurement)
TINY = dict(n_embd=32, n_layer=2, n_head=4, n_positions=128)


def gpt2_small(seed: int, tiny: bool = False):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    shape = TINY if tiny else {}
    return GPT2LMHeadModel(GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **shape))


def build_memlm(seed: int, checkpoint_segments: bool, tiny: bool = False):
    import memlm

    return memlm.wrap("armt", gpt2_small(seed, tiny), segment_len=SEGMENT, num_mem_tokens=MEM,
                      d_mem=D_MEM, checkpoint_segments=checkpoint_segments)


def build_original(seed: int, repo: Path, n_segments: int):
    import importlib.util

    try:  # the original imports wandb at module level but never calls it on this path
        import wandb  # noqa: F401
    except ImportError:
        sys.modules["wandb"] = types.ModuleType("wandb")
    path = repo / "modeling_amt" / "language_modeling.py"
    spec = importlib.util.spec_from_file_location("_armt_original", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"finetune_gpu: cannot import {path}")
    orig = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(orig)
    cell = orig.AssociativeMemoryCell(gpt2_small(seed), num_mem_tokens=MEM, d_mem=D_MEM,
                                      layers_attr="transformer.h", wrap_pos=False)
    return orig.AssociativeRecurrentWrapper(cell, segment_size=SEGMENT,
                                            max_n_segments=n_segments, k2=-1,
                                            segment_alignment="left")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", choices=["memlm", "original"], required=True)
    p.add_argument("--repo", type=Path, help="checkout of the original ARMT repository "
                   "(required with --impl original)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--warmup", type=int, default=10, help="untimed first steps (default 10)")
    p.add_argument("--stages", default="2,3,5", help="segments per stage (default 2,3,5)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per step (default 8)")
    p.add_argument("--checkpoint-segments", action="store_true",
                   help="memlm only: recompute each segment in backward")
    p.add_argument("--tiny", action="store_true", help="memlm only: a tiny model and 32-token "
                   "segments, to smoke-test the script on a CPU (numbers mean nothing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the result here (default: stdout only)")
    args = p.parse_args(argv)
    if args.impl == "original" and args.repo is None:
        p.error("--impl original needs --repo")
    if args.tiny and args.impl == "original":
        p.error("--tiny is for memlm's side only")
    global SEGMENT
    if args.tiny:
        SEGMENT = 32
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    plan = curriculum(args.stages, args.steps)
    vocab = 50257
    gen = torch.Generator().manual_seed(args.seed + 1)

    models = {}

    def model_for(n: int):
        # memlm: one model for every length; the original fixes max_n_segments per wrapper,
        # so it gets one wrapper per stage around the same cell (as its scripts restart)
        if args.impl == "memlm":
            if "m" not in models:
                models["m"] = build_memlm(args.seed, args.checkpoint_segments,
                                          args.tiny).to(device)
            return models["m"]
        if "cell" not in models:
            models[n] = build_original(args.seed, args.repo, n).to(device)
            models["cell"] = models[n].memory_cell
        elif n not in models:
            wrapper = type(models[next(k for k in models if k != "cell")])
            models[n] = wrapper(models["cell"], segment_size=SEGMENT, max_n_segments=n, k2=-1,
                                segment_alignment="left").to(device)
        return models[n]

    first = model_for(plan[0])
    opt = torch.optim.AdamW([q for q in first.parameters() if q.requires_grad], lr=1e-4,
                            weight_decay=0.01)
    timed_tokens, timed_s = 0, 0.0
    losses = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step, n in enumerate(plan):
        model = model_for(n).train()
        ids = torch.randint(0, vocab, (args.batch_size, n * SEGMENT), generator=gen).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if args.impl == "memlm":
                loss = model(ids, targets=ids.roll(-1, dims=1)).loss
            else:  # the original shifts labels itself (labels = input_ids)
                loss = model(input_ids=ids, labels=ids,
                             attention_mask=torch.ones_like(ids))["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(first.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            timed_s += time.perf_counter() - t0
            timed_tokens += ids.numel()
        losses.append(float(loss.detach()))
    result = {
        "impl": args.impl, "device": torch.cuda.get_device_name() if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "steps": len(plan), "timed_steps": max(0, len(plan) - args.warmup),
        "stages": args.stages, "batch_size": args.batch_size, "segment": SEGMENT,
        "num_mem_tokens": MEM, "d_mem": D_MEM, "checkpoint_segments": args.checkpoint_segments,
        "tiny": args.tiny,
        "tokens_per_sec": timed_tokens / max(timed_s, 1e-9),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30
        if device.type == "cuda" else None,
        "first_loss": losses[0], "last_loss": losses[-1],
    }
    print(json.dumps(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
