"""Compute of the fine-tuning presets at the original scale (docs/finetune.md).

    python benchmarks/finetune_compute.py [--mfu 0.3] [--peak-tflops 989]

Neither the original scripts nor the papers state GPU hours, so they are estimated here
from each preset's own numbers: tokens = sum over stages of steps x batch x grad_accum x
seq_len; the backbone also reads the memory tokens of every segment; training FLOPs =
6 x parameters x backbone tokens (forward + backward; x 8/6 with checkpoint_segments, whose
backward recomputes the forward; attention's own FLOPs are left out, under 10% at these
segment lengths). GPU hours = FLOPs / (peak x MFU). The parameter counts come from the
backbones' published configs, built on PyTorch's meta device (no weights, no download).
The default peak is an H100 SXM's dense bf16 989 TFLOP/s; MFU 0.3 is an assumption, not
a measurement (GPT-2-small-sized models usually reach less).
"""
from __future__ import annotations

import argparse
import json

import torch

#: the public configs of the presets' backbones (hub: gpt2, meta-llama/Llama-3.2-1B)
BACKBONES = {
    "hf:gpt2": ("gpt2", {}),
    "hf:meta-llama/Llama-3.2-1B": ("llama", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)),
}
PRESETS = ("armt-gpt2-babilong", "rmt-gpt2-wikitext", "armt-llama-pg19-sliding")


def backbone_params(name: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, fields = BACKBONES[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields))
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


def preset_compute(name: str, mfu: float, peak_tflops: float) -> dict:
    from memlm.config import load_run_config

    cfg = load_run_config(name)
    m, t = cfg.model, cfg.train
    stages = t.curriculum or [{"steps": t.max_steps}]
    extra = 2 * m.num_mem_tokens if m.arch == "rmt" else m.num_mem_tokens
    tokens = backbone_tokens = 0
    for st in stages:
        seq = int(st.get("seq_len", cfg.data.seq_len or m.context_len))
        n = int(st["steps"]) * int(st.get("batch_size", t.batch_size)) * int(
            st.get("grad_accum", t.grad_accum)) * seq
        segments = -(-seq // m.segment_len)
        tokens += n
        backbone_tokens += n + n // seq * segments * extra
    params = backbone_params(m.backbone)
    flops = (8 if getattr(m, "checkpoint_segments", False) else 6) * params * backbone_tokens
    hours = flops / (peak_tflops * 1e12 * mfu) / 3600
    return {"preset": name, "backbone": m.backbone, "params": params,
            "steps": sum(int(s["steps"]) for s in stages), "train_tokens": tokens,
            "backbone_tokens": backbone_tokens, "train_flops": flops,
            "gpu_hours": round(hours, 1), "mfu": mfu, "peak_tflops": peak_tflops}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mfu", type=float, default=0.3, help="assumed model FLOP utilisation")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="dense bf16 peak of the GPU (default: H100 SXM, 989)")
    args = p.parse_args(argv)
    for name in PRESETS:
        r = preset_compute(name, args.mfu, args.peak_tflops)
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
