"""Print how far memlm's importers are from each golden fixture (tests/fixtures/).

    python tools/parity_report.py

For every fixture written by tools/parity_fixtures.py: the original's repository
and commit, then max |logit difference|, |loss difference| and |gradient-norm
difference| of the memlm model loaded through `memlm.convert`. These are the
numbers docs/faithful.md quotes; tests/test_parity.py asserts them to 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from memlm.convert import (
    build_armt,
    build_dnc_gpt2,
    build_gmt_v7,
    build_rmt,
    build_tmt,
    dnc_memory_from_original,
)

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def _grad_norm(model: torch.nn.Module) -> torch.Tensor:
    return torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]).norm()


def gmt(weights, exp, cfg) -> list[tuple[str, float]]:
    common = {"n_head": cfg["n_heads"], "dropout": 0.0, "attn_dropout": 0.0}
    model = build_gmt_v7(dict(weights), {**common, "eval_update_memory": False}).eval()
    ids = exp["input_ids"]
    with torch.no_grad():
        out = model(ids[:, :-1], targets=ids[:, 1:])
    rows = [("eval logits", (out.logits - exp["logits"]).abs().max().item()),
            ("eval loss", (out.lm_loss - exp["loss"]).abs().item())]
    model = build_gmt_v7(dict(weights), common).eval()
    with torch.no_grad():
        model(ids[:, :-1])
        second = model(ids[:, :-1]).logits
    rows.append(("logits after one write-back", (second - exp["logits_update_2"]).abs().max().item()))
    model = build_gmt_v7(dict(weights), common).train()
    out = model(ids[:, :-1], targets=ids[:, 1:])
    out.loss.backward()
    rows.append(("train loss (LM + 5 aux)", (out.loss - exp["train_total_loss"]).abs().item()))
    rows.append(("train grad norm", (_grad_norm(model) - exp["train_grad_norm"]).abs().item()))
    return rows


def wrapped(name, weights, exp, cfg) -> list[tuple[str, float]]:
    overrides = {"n_head": cfg["gpt2"]["n_head"], "segment_len": cfg["segment_size"]}
    if name.startswith("armt"):
        model = build_armt(dict(weights), {**overrides, "correction": cfg["correction"]})
    else:
        model = build_rmt(dict(weights), overrides)
    model.eval()
    ids = exp["input_ids"]
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    out = model(ids, targets=targets)
    out.loss.backward()
    return [("logits, 3 segments", (out.logits - exp["logits"]).abs().max().item()),
            ("loss", (out.loss - exp["loss"]).abs().item()),
            ("grad norm", (_grad_norm(model) - exp["grad_norm"]).abs().item())]


def dnc(weights, exp, cfg) -> list[tuple[str, float]]:
    memory = dnc_memory_from_original(weights, cfg)
    hidden = exp["hidden"]
    with torch.no_grad():
        result = memory(hidden, memory.init_state(hidden.shape[0]))
        logits = (hidden + result.out) @ weights["lm_head.weight"].T
    rows = [("logits (memory + head)", (logits - exp["logits"]).abs().max().item()),
            ("final memory", (result.state.memory - exp["memory"]).abs().max().item())]
    model = build_dnc_gpt2(dict(weights), {"n_head": cfg["num_heads"],
                                           "mem_slots": cfg["mem_slots"], "dropout": 0.0}).eval()
    ids = exp["input_ids"]
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    with torch.no_grad():
        out = model(ids, targets=targets)
        erf = build_dnc_gpt2(dict(weights), {"n_head": cfg["num_heads"], "activation": "gelu",
                                             "mem_slots": cfg["mem_slots"], "dropout": 0.0})
        erf_logits = erf.eval()(ids).logits
    rows += [("whole model logits", (out.logits - exp["logits"]).abs().max().item()),
             ("whole model loss", (out.lm_loss - exp["loss"]).abs().item()),
             ("whole model final memory", (out.state.memory - exp["memory"]).abs().max().item()),
             ("same, exact GELU (control)", (erf_logits - exp["logits"]).abs().max().item())]
    return rows


def tmt(weights, exp, cfg) -> list[tuple[str, float]]:
    overrides = {"mesh_k": cfg["graph_k"], "exit_threshold": cfg["exit_threshold"],
                 "context_len": cfg["max_seq_len"], "dropout": 0.0}
    model = build_tmt(dict(weights), overrides).eval()
    ids = exp["input_ids"]
    with torch.no_grad():
        out = model(ids[:, :-1], targets=ids[:, 1:])
    rows = [("eval logits", (out.logits - exp["logits"]).abs().max().item()),
            ("eval loss (CE)", (out.lm_loss - exp["loss"]).abs().item()),
            ("eval loss (CE + 0.1 gate)", (out.loss - exp["total_loss"]).abs().item())]
    model = build_tmt(dict(weights), overrides).train()
    out = model(ids[:, :-1], targets=ids[:, 1:])
    out.loss.backward()
    rows.append(("train loss", (out.loss - exp["train_total_loss"]).abs().item()))
    rows.append(("train grad norm", (_grad_norm(model) - exp["train_grad_norm"]).abs().item()))
    ema = max((b.anchors.memory - exp[f"memory_after_train.{i}"]).abs().max().item()
              for i, b in enumerate(model.blocks))
    rows.append(("anchors after the EMA write", ema))
    return rows


def main() -> None:
    for path in sorted(FIXTURES.glob("*.expected.safetensors")):
        name = path.name.removesuffix(".expected.safetensors")
        with safe_open(str(FIXTURES / f"{name}.safetensors"), "pt") as f:
            meta = f.metadata()
        weights = load_file(str(FIXTURES / f"{name}.safetensors"))
        exp = load_file(str(path))
        cfg = json.loads(meta["config"])
        if name.startswith("gmt"):
            rows = gmt(weights, exp, cfg)
        elif name.startswith("dnc"):
            rows = dnc(weights, exp, cfg)
        elif name == "tmt":
            rows = tmt(weights, exp, cfg)
        else:
            rows = wrapped(name, weights, exp, cfg)
        print(f"{name}: {meta['repo']} @ {meta['commit'][:12]}"
              + (f" (transformers {meta['transformers']})" if "transformers" in meta else ""))
        for what, value in rows:
            print(f"  {what:<30} {value:.2e}")


if __name__ == "__main__":
    main()
