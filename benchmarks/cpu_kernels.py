"""The kernel choices behind the dense baseline's CPU speed, timed side by side.

Each row times forward + backward of one building block at the baby-GPT shapes
(batch 12 x 64 tokens, d 128, 4 heads) in two or more ways, interleaved round by
round in one process so that load from other processes hits every variant alike;
the median round is reported. These are the measurements behind three choices in
memlm/nn: exact (erf) GELU rather than the tanh form, RoPE as one complex product,
and `scaled_dot_product_attention` rather than an explicit softmax; plus the bf16
matmul rate that makes `precision: auto` pick fp32 on CPUs without bf16 instructions.

    python benchmarks/cpu_kernels.py [--rounds 7] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _common import load_average, print_table, write_json
from torch.nn.attention import SDPBackend, sdpa_kernel

from memlm.nn import RotaryEmbedding

B, T, D, H = 12, 64, 128, 4
DH = D // H


def _rope_strided_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The textbook RoPE: four real products on the even and odd channel halves."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def _attention_explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2)) * DH ** -0.5
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def _sdpa_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def groups() -> dict[str, dict[str, Callable[[], torch.Tensor]]]:
    """Each group: variants computing the same thing (checked), as fwd+bwd closures."""
    act = torch.randn(B * T, 4 * D, requires_grad=True)
    qk = torch.randn(B, T, 3, H, DH).permute(2, 0, 3, 1, 4)[0].detach().requires_grad_()
    q, k, v = (torch.randn(B, H, T, DH, requires_grad=True) for _ in range(3))
    rope = RotaryEmbedding(DH, T)
    cos, sin = rope.cos[:T], rope.sin[:T]
    a32, b32 = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    b16_t = b16.t().contiguous()  # F.linear(a, w) is a @ w.T: pass the transpose

    def fb(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            out = fn()
            out.backward(torch.ones_like(out))
            return out.detach()
        return run

    return {
        "GELU, 768 x 512 activation (fwd+bwd)": {
            "tanh approximation": fb(lambda: F.gelu(act, approximate="tanh")),
            "exact erf (memlm)": fb(lambda: F.gelu(act)),
        },
        "RoPE on one head tensor 12 x 4 x 64 x 32 (fwd+bwd)": {
            "four real products on strided halves": fb(lambda: _rope_strided_halves(qk, cos, sin)),
            "one complex product (memlm)": fb(lambda: rope(qk, slice(0, T))),
        },
        "causal attention 12 x 4 x 64 x 32 (fwd+bwd)": {
            "explicit softmax": fb(lambda: _attention_explicit(q, k, v)),
            "SDPA math backend": fb(lambda: _sdpa_math(q, k, v)),
            "SDPA default (flash, memlm)": fb(
                lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        },
        "matmul 1024 x 1024 (forward)": {
            "fp32 torch.mm": lambda: a32 @ b32,
            "bf16 torch.mm": lambda: (a16 @ b16).float(),
            "bf16 F.linear": lambda: F.linear(a16, b16_t).float(),
        },
    }


def time_group(variants: dict[str, Callable[[], torch.Tensor]], rounds: int,
               budget_s: float = 0.25) -> dict[str, float]:
    """Median seconds per call of each variant, rounds interleaved across variants."""
    calls = {}
    for name, fn in variants.items():  # warm-up, and calls per round from one timed call
        fn()
        t0 = time.perf_counter()
        fn()
        calls[name] = max(1, min(200, int(budget_s / max(time.perf_counter() - t0, 1e-6))))
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            samples[name].append((time.perf_counter() - t0) / calls[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_start = load_average()
    rows = []
    for group, variants in groups().items():
        outs = [fn() for fn in variants.values()]
        for out in outs[1:]:  # the variants must agree before their speed means anything
            err = float((out - outs[0]).norm() / outs[0].norm())
            if err > (1e-2 if "matmul" in group else 1e-3):  # bf16 rounds to ~3 digits
                raise AssertionError(f"{group}: variants disagree (relative error {err:.2e})")
        times = time_group(variants, args.rounds)
        best = min(times.values())
        for name, sec in times.items():
            row = {"block": group, "variant": name, "us_per_call": sec * 1e6,
                   "x_slower_than_best": sec / best}
            if "matmul" in group:
                row["gflops"] = 2 * 1024**3 / sec / 1e9
            rows.append(row)
    print_table(rows, ["block", "variant", "us_per_call", "x_slower_than_best", "gflops"])
    load_end = load_average()
    print(f"{torch.get_num_threads()} threads; load average {load_start:.2f} -> {load_end:.2f}")
    write_json("cpu_kernels", {"args": vars(args), "rows": rows,
                               "loadavg_start_end": [load_start, load_end]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
