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

from memlm.convert import build_armt, build_gmt_v7, build_rmt, dnc_memory_from_original

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
    return [("logits (memory + head)", (logits - exp["logits"]).abs().max().item()),
            ("final memory", (result.state.memory - exp["memory"]).abs().max().item())]


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
        else:
            rows = wrapped(name, weights, exp, cfg)
        print(f"{name}: {meta['repo']} @ {meta['commit'][:12]}"
              + (f" (transformers {meta['transformers']})" if "transformers" in meta else ""))
        for what, value in rows:
            print(f"  {what:<30} {value:.2e}")


if __name__ == "__main__":
    main()
