"""Precision policy: when to run matmuls in bf16, shared by the trainer and every evaluator.

"auto" means bf16 autocast only where it is measured to be faster: on CUDA GPUs with
bf16 support, and on CPUs with native bf16 instructions. Elsewhere fp32 is both faster
and more exact.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

_FAST_BF16: dict[str, bool] = {}


def bf16_is_faster(device_type: str) -> bool:
    """Whether bf16 autocast speeds up matmuls here (measured once per process on CPU).

    CUDA GPUs with bf16 support always gain. CPUs gain only with bf16 instructions
    (AVX512-BF16 / AMX); without them bf16 matmuls are emulated and run many times slower
    than fp32 (15x slower on an AVX2-only AMD EPYC), so "auto" keeps fp32. On a Xeon with
    AMX the bf16 GEMM measured 7-8x faster than fp32 (docs/speed.md).
    """
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type not in _FAST_BF16:
        import time

        import torch.nn.functional as F

        # nn.Linear's kernel (F.linear), which training runs, not `a @ b`: on some CPUs the
        # two reach different bf16 libraries (10x apart). Rounds alternate the dtypes and
        # each keeps its fastest round, so a stall caused by other processes cannot flip
        # the verdict.
        a = torch.randn(256, 256)
        best = {torch.float32: math.inf, torch.bfloat16: math.inf}
        for _ in range(5):
            for dtype in best:
                x = a.to(dtype)
                F.linear(x, x)  # warm-up: library initialisation, packed buffers
                t0 = time.perf_counter()
                for _ in range(4):
                    F.linear(x, x)
                best[dtype] = min(best[dtype], time.perf_counter() - t0)
        _FAST_BF16[device_type] = best[torch.bfloat16] < 0.8 * best[torch.float32]
    return _FAST_BF16[device_type]


def resolve_precision(device: torch.device | str, precision: str) -> str:
    """'auto' -> 'bf16' where bf16 is faster on this device, else 'fp32'."""
    if precision != "auto":
        return precision
    return "bf16" if bf16_is_faster(torch.device(device).type) else "fp32"


def autocast_context(device: torch.device | str, precision: str = "auto"
                     ) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast when `precision` (after resolving "auto") asks for it, else a no-op."""
    device_type = torch.device(device).type
    precision = resolve_precision(device, precision)
    if precision == "bf16" and device_type in ("cpu", "cuda"):
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
