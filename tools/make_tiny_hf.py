"""Write a small randomly initialised transformers causal LM folder (a stand-in for a
pretrained one) so the fine-tuning presets run on a CPU without downloaded weights.

    python tools/make_tiny_hf.py gpt2 /tmp/tiny-gpt2 --bpe /path/to/gpt2-bpe
    memlm train armt-gpt2-babilong --set model.backbone=hf:/tmp/tiny-gpt2 ...

The folder holds config.json + model.safetensors (save_pretrained) and, with --bpe (a
folder with GPT-2's encoder.json and vocab.bpe), GPT-2's real tokenizer as tokenizer.json,
so `data.tokenizer: hf:FOLDER` gives GPT-2's ids. Families: gpt2, llama (the Llama-3.2
shape: GQA, tied embeddings, llama3 RoPE scaling), qwen2, mistral. docs/finetune.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def family_config(family: str, vocab_size: int, d_model: int, n_layer: int, n_head: int,
                  positions: int, eos: int):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=4 * d_model,
                  num_hidden_layers=n_layer, num_attention_heads=n_head,
                  num_key_value_heads=max(1, n_head // 2), max_position_embeddings=positions,
                  bos_token_id=eos, eos_token_id=eos)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=positions, n_embd=d_model,
                          n_layer=n_layer, n_head=n_head, bos_token_id=eos, eos_token_id=eos)
    if family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True,
                           rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 8192})
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    raise SystemExit(f"make_tiny_hf: unknown family {family!r}; use gpt2, llama, qwen2, mistral")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("family", choices=["gpt2", "llama", "qwen2", "mistral"])
    p.add_argument("out", help="folder to write (created)")
    p.add_argument("--bpe", help="folder with GPT-2's encoder.json + vocab.bpe: write GPT-2's "
                   "tokenizer (default: none, vocabulary 50,257 without a tokenizer)")
    p.add_argument("--d-model", type=int, default=64, help="hidden size (default 64)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--positions", type=int, default=1024, help="max positions (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    args = p.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    from memlm.data.tokenizer_export import transformers_tokenizer_files
    from memlm.data.tokenizers import GPT2Tokenizer

    out = Path(args.out)
    if args.bpe and not Path(args.bpe).is_dir():
        print(f"make_tiny_hf: --bpe {args.bpe} is not a folder", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    config = family_config(args.family, 50257, args.d_model, args.layers, args.heads,
                           args.positions, eos=50256)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    if args.bpe:
        files = transformers_tokenizer_files(GPT2Tokenizer(args.bpe))
        (out / "tokenizer.json").write_text(files["tokenizer.json"])
        (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    print(f"wrote a random {args.family} ({args.layers} layers, d {args.d_model}) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
