"""Training speed of every memlm architecture against memlm's dense baseline and nanoGPT.

For each size (`tiny`, `small`) and precision (fp32, bf16 autocast), every registered
architecture is trained by memlm's own `Trainer`, and next to it (in the processes just
before) the dense pair is measured again: memlm's dense GPT (`arch: gpt`) and a
nanoGPT-equivalent model and loop written below (GPT-2 blocks, learned positions, causal
`F.scaled_dot_product_attention`, AdamW as nanoGPT builds it on CPU, the plain loop with
`loss.item()` on log steps only). Each measurement is a separate process, so allocator
state, thread pools and compiled kernels never leak from one into the next; the ratios
`arch / memlm dense` and `memlm / nanoGPT` come from neighbouring processes, which is
what keeps them meaningful on a machine whose load changes while the benchmark runs.

The matmul peak is measured in the same run, per size, at the model's own GEMM shapes
(forward, input-gradient and weight-gradient products of every linear layer, each timed
alone) and on square matrices; the dense baseline's MFU is its model FLOP/s (6 N + attention
per token, `_common.flops_per_token`) over the larger of the two peaks, so the MFU is never
flattered by a slow reference.

Sizes (vocab 256, byte tokens): tiny = 2 layers, 4 heads, d 64, seq 64, batch 8, with each
architecture's registered tiny memory sizes; small = 6 layers, 8 heads, d 256, seq 256,
batch 8, with library defaults. RMT/ARMT read 2 segments per sample (segment_len = seq / 2).

    python benchmarks/speed_vs_peers.py                 # tiny + small, fp32 + bf16 (~25 min)
    python benchmarks/speed_vs_peers.py --quick         # tiny only, ~2 min
    python benchmarks/speed_vs_peers.py --render benchmarks/results/speed_vs_peers.json

Writes benchmarks/results/speed_vs_peers.json (machine: CPU model and flags, torch version,
threads, load average) and the markdown table next to it (speed_vs_peers.md); `--render`
prints the table of an existing JSON again (the README's table is that output).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

VOCAB = 256
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=2, n_head=4, d_model=64, seq=64, batch=8),
    "small": dict(n_layer=6, n_head=8, d_model=256, seq=256, batch=8),
    # GEMM-dominated: where the dense baseline's MFU says how close it is to the matrix units
    "medium": dict(n_layer=8, n_head=8, d_model=512, seq=512, batch=8),
}
#: sizes measured when --sizes is not given (medium is opt-in: a minute per cell at 2 threads)
DEFAULT_SIZES = "tiny,small"
PRECISIONS = ("fp32", "bf16")
#: architectures that read `SEGMENTS` segments per training sample
SEGMENTED = ("rmt", "armt")
#: rows that are a registered architecture with options (measured only when --archs names
#: them): the DNC with its memory recurrence compiled (`compile_step`); its first step,
#: which includes the compilation, is reported next to its speed
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"dnc-compiled": ("dnc", {"compile_step": True})}
SEGMENTS = 2


class BenchError(Exception):
    """A bad command line or a failed measurement: one line, exit status 2."""


# ----- the nanoGPT-equivalent model and loop ---------------------------------------------------


def nanogpt_model(n_layer: int, n_head: int, d_model: int, seq: int, vocab: int):
    """A GPT-2-style decoder built the way nanoGPT's model.py builds it (our own code).

    Pre-LayerNorm blocks, one fused qkv projection, causal SDPA, a 4x GELU MLP, learned
    positions, biases, and an LM head tied to the token embedding; N(0, 0.02) init with
    the residual projections scaled by 1/sqrt(2 n_layer).
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn = nn.Linear(d_model, 3 * d_model)
            self.c_proj = nn.Linear(d_model, d_model)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, c = x.shape
            q, k, v = self.c_attn(x).split(d_model, dim=2)
            q, k, v = (z.view(b, t, n_head, c // n_head).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1 = nn.LayerNorm(d_model)
            self.attn = Attention()
            self.ln_2 = nn.LayerNorm(d_model)
            self.c_fc = nn.Linear(d_model, 4 * d_model)
            self.c_proj = nn.Linear(4 * d_model, d_model)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attn(self.ln_1(x))
            return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = nn.Embedding(vocab, d_model)
            self.wpe = nn.Embedding(seq, d_model)
            self.h = nn.ModuleList(Block() for _ in range(n_layer))
            self.ln_f = nn.LayerNorm(d_model)
            self.lm_head = nn.Linear(d_model, vocab, bias=False)
            self.lm_head.weight = self.wte.weight
            for name, p in self.named_parameters():
                if p.dim() >= 2:
                    std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
                    nn.init.normal_(p, 0.0, std)
                elif name.endswith("bias"):
                    nn.init.zeros_(p)

        def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            pos = torch.arange(idx.shape[1], device=idx.device)
            x = self.wte(idx) + self.wpe(pos)
            for block in self.h:
                x = block(x)
            logits = self.lm_head(self.ln_f(x))
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    return GPT()


def nanogpt_optimizer(model, lr: float = 1e-3, weight_decay: float = 0.1):
    """AdamW as nanoGPT's configure_optimizers makes it: decay >= 2-D tensors; on CPU not fused."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = torch.cuda.is_available() and next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=fused)


# ----- workers: one measurement each ------------------------------------------------------------


#: what `--clock` names: wall time, or the calling thread's CPU time (with --threads 1 the
#: only thread that computes), which other processes on a shared machine disturb far less
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
_clock = CLOCKS["wall"]


def _timed_steps(step, seconds: float, warmup: int, min_steps: int) -> dict[str, float]:
    """Run `step()` `warmup` times, then for about `seconds` (wall); the median step time
    on the `--clock` (the first step, which compiles where anything does, in wall time)."""
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    times: list[float] = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < min_steps:
        t0 = _clock()
        step()
        times.append(_clock() - t0)
    return {"step_s": statistics.median(times), "steps": len(times), "first_step_s": first}


def _gemm_shapes(n_layer: int, d_model: int, seq: int, batch: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of every GEMM in one training step of the dense model (per layer once).

    For y = x W^T with x [M, K], W [N, K]: forward M x K x N, input gradient M x N x K,
    weight gradient N x M x K. Linear layers: qkv, attention out, MLP up, MLP down, LM head.
    """
    m = seq * batch
    shapes = []
    for k, n in ((d_model, 3 * d_model), (d_model, d_model), (d_model, 4 * d_model),
                 (4 * d_model, d_model), (d_model, VOCAB)):
        shapes += [(m, k, n), (m, n, k), (n, m, k)]
    return shapes


def work_peak(spec: dict[str, Any]) -> dict[str, Any]:
    """Matmul FLOP/s per precision: square matrices and this size's own GEMM shapes."""
    import torch
    from _common import matmul_peak

    size = SIZES[spec["size"]]
    shapes = _gemm_shapes(size["n_layer"], size["d_model"], size["seq"], size["batch"])
    out: dict[str, Any] = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        square = matmul_peak(dtype, seconds=spec["peak_seconds"], clock=_clock)
        flops, seconds = 0.0, 0.0
        per_shape = spec["peak_seconds"] / len(shapes)
        for m, k, n in shapes:
            a = torch.randn(m, k, dtype=dtype)
            w = torch.randn(n, k, dtype=dtype)
            res = _timed_steps(lambda a=a, w=w: torch.nn.functional.linear(a, w),
                               per_shape, warmup=2, min_steps=3)
            flops += 2.0 * m * k * n
            seconds += res["step_s"]
        out[precision] = {"square": square, "model_shapes": flops / seconds}
    return out


def work_nanogpt(spec: dict[str, Any]) -> dict[str, Any]:
    """Tokens/s of the nanoGPT-equivalent training loop."""
    import contextlib

    import numpy as np
    import torch

    size = SIZES[spec["size"]]
    torch.manual_seed(spec["seed"])
    model = nanogpt_model(size["n_layer"], size["n_head"], size["d_model"], size["seq"], VOCAB)
    optimizer = nanogpt_optimizer(model)
    data = np.random.default_rng(spec["seed"]).integers(0, VOCAB, 1 << 20, dtype=np.uint16)
    seq, batch = size["seq"], size["batch"]
    ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if spec["precision"] == "bf16"
           else contextlib.nullcontext())
    it = [0]

    def step() -> None:
        ix = torch.randint(len(data) - seq - 1, (batch,))
        x = torch.stack([torch.from_numpy(data[i:i + seq].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + seq].astype(np.int64)) for i in ix])
        with ctx:
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        it[0] += 1
        if it[0] % 10 == 0:
            loss.item()  # nanoGPT syncs only on its log steps

    res = _timed_steps(step, spec["seconds"], spec["warmup"], spec["min_steps"])
    c, d = size["n_layer"], size["d_model"]
    n_matmul = sum(p.numel() for n, p in model.named_parameters()
                   if p.dim() >= 2 and not n.startswith(("wte", "wpe"))) + d * VOCAB
    res["flops_per_token"] = 6.0 * n_matmul + 12.0 * c * seq * d
    res["params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
    return res


def warm_trainer(arch: str, size: str, precision: str):
    """memlm's Trainer for `arch` at `size` on byte tokens of the built-in stories, after two
    untimed steps (what the profile and benchmarks/step_ab.py time)."""
    from memlm.config import DataConfig, RunConfig, TrainConfig, model_config_from_dict
    from memlm.train.trainer import Trainer

    sz = SIZES[size]
    cfg = RunConfig(
        model=model_config_from_dict(memlm_model_config(arch, size)),
        train=TrainConfig(max_steps=10**6, batch_size=sz["batch"], precision=precision,
                          warmup_steps=10, eval_every=10**9, save_every=10**9, seed=0,
                          device="cpu"),
        data=DataConfig(source="builtin:stories", tokenizer="byte"))
    trainer = Trainer(cfg, progress=False)
    for _ in range(2):
        trainer.train_step()
    return trainer


def memlm_model_config(arch: str, size_name: str, pos_emb: str | None = None) -> dict[str, Any]:
    """The model section for `arch` at `size_name` (see the module docstring)."""
    from memlm.registry import ARCHITECTURES

    size = SIZES[size_name]
    arch, options = VARIANTS.get(arch, (arch, {}))
    spec = ARCHITECTURES.get(arch)
    model: dict[str, Any] = dict(arch=arch, vocab_size=VOCAB, n_layer=size["n_layer"],
                                 n_head=size["n_head"], d_model=size["d_model"],
                                 context_len=size["seq"], dropout=0.0)
    if size_name == "tiny":
        model.update(spec.tiny)
    if arch in SEGMENTED:
        model["segment_len"] = size["seq"] // SEGMENTS
    if pos_emb:
        model["pos_emb"] = pos_emb
    model.update(options)
    return model


def work_memlm(spec: dict[str, Any]) -> dict[str, Any]:
    """Tokens/s of memlm's Trainer.train_step on `arch`."""
    from _common import flops_per_token

    from memlm.config import DataConfig, RunConfig, TrainConfig, model_config_from_dict
    from memlm.train.trainer import Trainer

    size = SIZES[spec["size"]]
    cfg = RunConfig(
        model=model_config_from_dict(memlm_model_config(spec["arch"], spec["size"],
                                                        spec.get("pos_emb"))),
        train=TrainConfig(max_steps=10**6, batch_size=size["batch"],
                          precision=spec["precision"], compile=spec["compile"],
                          warmup_steps=10, eval_every=10**9, save_every=10**9,
                          seed=spec["seed"], device="cpu"),
        data=DataConfig(source="builtin:stories", tokenizer="byte"),
    )
    trainer = Trainer(cfg, progress=False)
    tokens_per_step = [0]

    def step() -> None:
        before = trainer.tokens_seen
        trainer.train_step()
        tokens_per_step[0] = trainer.tokens_seen - before

    res = _timed_steps(step, spec["seconds"], spec["warmup"], spec["min_steps"])
    float(trainer.train_step()["loss"])  # the loss is finite and reachable
    res["tokens_per_step"] = tokens_per_step[0]
    res["params_M"] = trainer.model.num_params() / 1e6
    if spec["arch"] == "gpt":
        res["flops_per_token"] = flops_per_token(trainer.model, size["seq"])
    return res


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    global _clock
    _clock = CLOCKS[spec.get("clock", "wall")]
    torch.set_num_threads(spec["threads"])
    if spec.get("max_autotune"):  # what mode="max-autotune-no-cudagraphs" sets on CPU
        import torch._inductor.config as inductor_config

        inductor_config.max_autotune = True
    fn = {"peak": work_peak, "nanogpt": work_nanogpt, "memlm": work_memlm}[spec["kind"]]
    result = fn(spec)
    if spec["kind"] != "peak":
        size = SIZES[spec["size"]]
        tokens = result.pop("tokens_per_step", size["seq"] * size["batch"])
        result["tokens_per_sec"] = tokens / result["step_s"]
    return result


def run_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; its JSON result, or BenchError."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    if spec.get("inductor_cache"):  # compiled kernels (and FX graphs) read and written here
        env["TORCHINDUCTOR_CACHE_DIR"] = spec["inductor_cache"]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"measurement {_label(spec)} took longer than {timeout:.0f} s") from e
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BenchError(f"measurement {_label(spec)} failed: {tail}")
    return json.loads(lines[-1][len("RESULT "):])


def _label(spec: dict[str, Any]) -> str:
    who = spec.get("arch") or spec["kind"]
    return f"{spec['kind']}:{who}@{spec['size']}/{spec.get('precision', '-')}"


def attention_kernels(threads: int, reps: int = 7) -> list[dict[str, Any]]:
    """Causal attention forward + backward on CPU: the candidate kernels per dtype, T and Dh.

    The measurement behind `memlm.nn.attention.causal_attention`'s bf16 route: batch 8,
    d 256 (H = 256 / Dh heads), random upstream gradient. bf16 inputs: SDPA's own bf16
    kernel (`sdpa`, flash), SDPA's math kernel (`sdpa_math`), explicit bf16 matmuls around
    an fp32 softmax (`explicit`) and the inputs cast to fp32 for SDPA's fp32 kernel, the
    output cast back (`fp32_kernel`, what memlm uses); fp32 inputs: SDPA. The kernels run
    alternately outside autocast and each keeps its median; on one thread the clock is the
    process's CPU time (other processes disturb it far less), else wall time.
    """
    import statistics

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from memlm.nn.attention import causal_attention

    def explicit_causal_attention(q, k, v):  # memlm's bf16 route for T <= 128 until round 4
        t = q.shape[-2]
        scores = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5
        future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
        return scores.masked_fill(future, float("-inf")).softmax(-1).to(v.dtype) @ v

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def sdpa_math(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return sdpa(q, k, v)

    def fp32_kernel(q, k, v):
        return sdpa(q.float(), k.float(), v.float()).to(q.dtype)

    torch.set_num_threads(threads)
    clock = time.process_time if threads == 1 else time.perf_counter
    candidates = {torch.bfloat16: {"sdpa": sdpa, "sdpa_math": sdpa_math,
                                   "explicit": explicit_causal_attention,
                                   "fp32_kernel": fp32_kernel, "memlm": causal_attention},
                  torch.float32: {"sdpa": sdpa, "memlm": causal_attention}}
    rows = []
    for dtype, kernels in candidates.items():
        for t in (64, 128, 144, 192, 256, 512):
            for dh in (16, 32, 64):
                gen = torch.Generator().manual_seed(t * dh)
                q, k, v, grad = (torch.randn(8, 256 // dh, t, dh, generator=gen).to(dtype)
                                 for _ in range(4))
                q, k, v = (x.requires_grad_() for x in (q, k, v))
                times: dict[str, list[float]] = {name: [] for name in kernels}
                for _ in range(reps):
                    for name, fn in kernels.items():
                        t0 = clock()
                        fn(q, k, v).backward(grad)
                        times[name].append(clock() - t0)
                row: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "T": t,
                                       "head_dim": dh}
                row.update({f"{name}_ms": statistics.median(ts) * 1e3
                            for name, ts in times.items()})
                rows.append(row)
    return rows


#: the forward regions `--profile` times separately, per architecture: (module, attribute)
#: pairs, wrapped in a profiler range (an attribute "Class.method" wraps that method)
PROFILE_REGIONS: dict[str, list[tuple[str, str]]] = {
    "armt": [("memlm.memory.associative", "AssociativeMemory.read"),
             ("memlm.memory.associative", "write_stacked")],
    "dnc": [("memlm.memory.dnc", "DNCMemory.forward")],
    "tmt": [("memlm.memory.mesh_attention", "MeshAttention.forward"),
            ("memlm.memory.mesh_attention", "select_mesh"),
            ("memlm.memory.mesh_attention", "masked_attention")],
}


def _wrap_regions(arch: str) -> list[str]:
    """Wrap `PROFILE_REGIONS[arch]` in profiler ranges named module:attribute."""
    import functools
    import importlib

    import torch

    names = []
    for module_name, attr in PROFILE_REGIONS.get(VARIANTS.get(arch, (arch,))[0], []):
        owner = importlib.import_module(module_name)
        *path, leaf = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        fn = getattr(owner, leaf)
        name = f"{module_name.rsplit('.', 1)[-1]}:{attr}"

        def wrapped(*a, _fn=fn, _name=name, **kw):
            with torch.profiler.record_function(_name):
                return _fn(*a, **kw)

        setattr(owner, leaf, functools.wraps(fn)(wrapped))
        names.append(name)
    return names


def profile_arch(arch: str, size: str, precision: str, threads: int, steps: int = 3,
                 rows: int = 25) -> str:
    """Where one architecture's training step spends its CPU time (torch.profiler).

    Times `steps` steps of memlm's trainer after two warm-up steps and returns the top
    operators by self CPU time, then the forward regions of `PROFILE_REGIONS` as a share
    of the step (a region's backward runs later, in autograd, and is not in its row).
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    regions = _wrap_regions(arch)
    sz = SIZES[size]
    trainer = warm_trainer(arch, size, precision)
    t0 = time.process_time()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with torch.profiler.record_function("train_step"):
                trainer.train_step()
    cpu = (time.process_time() - t0) / steps
    events = prof.key_averages()
    by_name = {e.key: e for e in events}
    step_us = by_name["train_step"].cpu_time_total
    lines = [f"{arch} @ {size}/{precision}, {threads} thread(s): {cpu:.3f} s CPU per profiled "
             "step (the profiler adds overhead)", "",
             events.table(sort_by="self_cpu_time_total", row_limit=rows), "",
             "| forward region | calls per step | CPU ms per step | share of the step |",
             "|---|---:|---:|---:|"]
    for name in regions:
        e = by_name.get(name)
        if e is None:
            continue
        lines.append(f"| {name} | {e.count / steps:.0f} | {e.cpu_time_total / steps / 1e3:.1f} | "
                     f"{e.cpu_time_total / step_us:.0%} |")
    tokens = sz["seq"] * sz["batch"]
    flops = {name: _train_flops(name, size, precision) / tokens
             for name in dict.fromkeys((arch, "gpt"))}
    # FlopCounterMode has no formula for the CPU flash kernel: add the causal attention it
    # executes, QK^T and PV over T/2 keys on average, forward + backward (3x)
    sdpa = 6.0 * sz["n_layer"] * sz["seq"] * sz["d_model"]
    if VARIANTS.get(arch, (arch,))[0] not in ("tmt", "tmt-xmem"):
        flops[arch] += sdpa
    flops["gpt"] = flops["gpt"] + sdpa if arch != "gpt" else flops["gpt"]
    lines += ["", "FLOPs per token of one forward + backward (torch FlopCounterMode, plus "
              f"{sdpa / 1e6:.1f} MFLOP of causal SDPA that it does not count on CPU):"]
    lines += [f"  {name}: {f / 1e6:.1f} MFLOP ({f / flops['gpt']:.2f}x gpt)"
              for name, f in flops.items()]
    return "\n".join(lines)


def _train_flops(arch: str, size: str, precision: str) -> float:
    """FLOPs of one forward + backward of `arch` at `size` on a random batch (counted)."""
    import contextlib

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import memlm
    from memlm.config import model_config_from_dict

    sz = SIZES[size]
    torch.manual_seed(0)
    model = memlm.build_from_config(model_config_from_dict(memlm_model_config(arch, size)))
    ids = torch.randint(0, VOCAB, (sz["batch"], sz["seq"] + 1))
    ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
           else contextlib.nullcontext())
    counter = FlopCounterMode(display=False)
    with counter:
        with ctx:
            loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
        loss.backward()
    return float(counter.get_total_flops())


# ----- the driver ------------------------------------------------------------------------------


def cpu_flags() -> list[str]:
    """The CPU flags that decide matmul speed (AVX2/AVX-512/AMX/BF16), from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = line.split(":", 1)[1].split()
            return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    return []


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every cell, interleaved; returns the JSON payload."""
    from _common import load_average

    from memlm import architectures

    archs = args.archs or architectures()
    unknown = sorted(set(archs) - set(architectures()) - set(VARIANTS))
    if unknown:
        raise BenchError(f"unknown architecture(s) {', '.join(unknown)}; registered: "
                         f"{', '.join(architectures())}; variants: {', '.join(VARIANTS)}")
    base = dict(seconds=args.seconds, warmup=args.warmup, min_steps=args.min_steps,
                threads=args.threads, seed=0, compile=args.compile, pos_emb=args.pos_emb,
                max_autotune=args.max_autotune, inductor_cache=args.inductor_cache,
                clock=args.clock)
    timeout = args.timeout
    runs: list[dict[str, Any]] = []
    peaks: dict[str, Any] = {}
    loads = [load_average()]

    def one(spec: dict[str, Any]) -> dict[str, Any]:
        spec = {**base, **spec}
        t0 = time.perf_counter()
        res = run_worker(spec, timeout)
        row = {**{k: spec.get(k) for k in ("kind", "arch", "size", "precision", "compile")},
               **res, "wall_s": time.perf_counter() - t0, "load": load_average()}
        runs.append(row)
        if args.verbose and spec["kind"] != "peak":
            print(f"  {_label(spec):32s} {res['tokens_per_sec']:>10,.0f} tok/s "
                  f"(load {row['load']:.1f})", flush=True)
        return row

    for size in args.sizes:
        peak_specs = {"kind": "peak", "size": size, "peak_seconds": args.peak_seconds}
        first = one(peak_specs)
        for precision in args.precisions:
            dense_only = [a for a in archs if a != "gpt"] or ["gpt"]
            for i, arch in enumerate(dense_only):
                pair_now = not args.pair_once or i == 0
                if pair_now:
                    one({"kind": "nanogpt", "size": size, "precision": precision})
                    one({"kind": "memlm", "arch": "gpt", "size": size, "precision": precision})
                if arch != "gpt":
                    one({"kind": "memlm", "arch": arch, "size": size, "precision": precision})
            if args.pair_once and len(dense_only) > 1:  # close the block with the pair again
                one({"kind": "nanogpt", "size": size, "precision": precision})
                one({"kind": "memlm", "arch": "gpt", "size": size, "precision": precision})
        last = one(peak_specs)
        peaks[size] = {p: {k: max(first[p][k], last[p][k]) for k in first[p]}
                       for p in PRECISIONS}
        loads.append(load_average())
    return {"runs": runs, "peaks": peaks, "loadavg_samples": loads,
            "archs": archs, "cpu_flags": cpu_flags()}


def summarise(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (size, precision, arch): ratios against the neighbouring dense pair."""
    rows: list[dict[str, Any]] = []
    runs = [r for r in payload["runs"] if r["kind"] != "peak"]
    for size in dict.fromkeys(r["size"] for r in runs):
        peak = payload["peaks"][size]
        for precision in dict.fromkeys(r["precision"] for r in runs if r["size"] == size):
            cell = [r for r in runs if r["size"] == size and r["precision"] == precision]
            pairs = _pairs(cell)
            # the dense baseline: memlm gpt / nanoGPT over every pair, and its MFU
            dense = [g for _, g in pairs]
            ratios = [g["tokens_per_sec"] / n["tokens_per_sec"] for n, g in pairs]
            tps = statistics.median(g["tokens_per_sec"] for g in dense)
            nano_tps = statistics.median(n["tokens_per_sec"] for n, _ in pairs)
            best_peak = max(peak[precision].values())
            rows.append({
                "size": size, "precision": precision, "arch": "gpt (dense)",
                "tokens_per_sec": tps, "vs_dense": 1.0,
                "vs_nanogpt": statistics.median(ratios),
                "vs_nanogpt_range": [min(ratios), max(ratios)],
                "nanogpt_tokens_per_sec": nano_tps,
                "mfu": tps * dense[0]["flops_per_token"] / best_peak,
                "nanogpt_mfu": nano_tps * pairs[0][0]["flops_per_token"] / best_peak,
                "peak_gflops": best_peak / 1e9,
            })
            for i, r in enumerate(cell):
                if r["kind"] != "memlm" or r["arch"] == "gpt":
                    continue
                n, g = _nearest_pair(cell, i)
                rows.append({
                    "size": size, "precision": precision, "arch": r["arch"],
                    "tokens_per_sec": r["tokens_per_sec"],
                    "vs_dense": r["tokens_per_sec"] / g["tokens_per_sec"],
                    "vs_nanogpt": r["tokens_per_sec"] / n["tokens_per_sec"],
                    "first_step_s": r.get("first_step_s"),
                })
    return rows


def _pairs(cell: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(nanoGPT, memlm gpt) measured back to back, in order."""
    out = []
    for a, b in zip(cell, cell[1:]):
        if a["kind"] == "nanogpt" and b["kind"] == "memlm" and b["arch"] == "gpt":
            out.append((a, b))
    if not out:
        raise BenchError("the results hold no dense pair (nanoGPT then memlm gpt)")
    return out


def _nearest_pair(cell: list[dict[str, Any]], i: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The dense pair measured last before run i (the first one after it, if none before)."""
    before, after = None, None
    for j, (a, b) in enumerate(zip(cell, cell[1:])):
        if a["kind"] == "nanogpt" and b["kind"] == "memlm" and b["arch"] == "gpt":
            if j + 1 < i:
                before = (a, b)
            elif after is None:
                after = (a, b)
    if before is None and after is None:
        raise BenchError("the results hold no dense pair (nanoGPT then memlm gpt)")
    return before or after


def markdown(payload: dict[str, Any]) -> str:
    """The README table: tokens/s, ratio to the neighbouring memlm dense and to nanoGPT."""
    m = payload.get("machine", {})
    pe = payload.get("args", {}).get("pos_emb")
    flags = " ".join(f for f in payload.get("cpu_flags", [])
                     if f.startswith(("amx", "avx512_bf16", "avx512f", "avx2")))
    lines = [
        f"Measured {payload.get('time', '?')} on {m.get('cpu', '?')} ({flags or 'no flags read'}), "
        f"{m.get('threads', '?')} threads, torch {m.get('torch', '?')}, load average "
        f"{', '.join(f'{x:.1f}' for x in payload.get('loadavg_samples', []))}"
        f"{' (compiled)' if payload.get('args', {}).get('compile') else ''}"
        f"{' (steps and peak timed by thread CPU time)' if payload.get('args', {}).get('clock') == 'cpu' else ''}"
        f"{pe and f' (memlm pos_emb {pe})' or ''}.",
        "",
        "| size | precision | arch | tokens/s | vs memlm dense | memlm / nanoGPT | dense MFU |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in summarise(payload):
        if r["arch"] == "gpt (dense)":
            lo, hi = r["vs_nanogpt_range"]
            ratio = (f"{r['vs_nanogpt']:.2f}" if abs(hi - lo) < 0.005
                     else f"{r['vs_nanogpt']:.2f} ({lo:.2f}-{hi:.2f})")
            mfu = (f"{r['mfu']:.0%} (nanoGPT {r['nanogpt_mfu']:.0%}, peak "
                   f"{r['peak_gflops']:,.0f} GFLOP/s)")
        else:
            ratio, mfu = f"{r['vs_nanogpt']:.2f}", ""
        arch = r["arch"]
        if arch in VARIANTS and r.get("first_step_s") is not None:
            arch += f" (first step {r['first_step_s']:.0f} s)"
        lines.append(f"| {r['size']} | {r['precision']} | {arch} | "
                     f"{r['tokens_per_sec']:,.0f} | {r['vs_dense']:.2f} | {ratio} | {mfu} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help="comma list of: " + ", ".join(SIZES))
    ap.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16")
    ap.add_argument("--archs", default="", help="comma list (default: every registered arch)")
    ap.add_argument("--seconds", type=float, default=8.0, help="timed seconds per measurement")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--min-steps", type=int, default=3)
    ap.add_argument("--peak-seconds", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--compile", action="store_true", help="memlm runs with train.compile")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="time steps and the peak by wall time, or by CPU time of the one "
                         "computing thread (needs --threads 1; for a shared machine)")
    ap.add_argument("--max-autotune", action="store_true",
                    help="with --compile: inductor's max_autotune (mode "
                         "'max-autotune-no-cudagraphs'): GEMM templates are benchmarked")
    ap.add_argument("--inductor-cache", metavar="DIR",
                    help="TORCHINDUCTOR_CACHE_DIR of every worker (a fresh DIR: a cold compile; "
                         "the same DIR again: the FX-graph and kernel caches are warm)")
    ap.add_argument("--pos-emb", choices=["rope", "learned"],
                    help="memlm models' positions (default: the library's, RoPE; nanoGPT's "
                         "peer always has learned positions)")
    ap.add_argument("--pair-once", action="store_true",
                    help="measure the dense pair at the start and end of each block only")
    ap.add_argument("--quick", action="store_true",
                    help="tiny only, 1.5 s per measurement, the pair once per block (~2 min)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per process")
    ap.add_argument("--out", default=str(HERE / "results" / "speed_vs_peers.json"))
    ap.add_argument("--render", metavar="JSON", help="print the table of a results file")
    ap.add_argument("--verbose", action="store_true", help="print each measurement")
    ap.add_argument("--attention", action="store_true",
                    help="only time causal attention kernels (SDPA vs explicit) and exit")
    ap.add_argument("--profile", metavar="ARCH",
                    help="profile ARCH's training step (first of --sizes/--precisions) and exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.seconds, args.peak_seconds, args.pair_once = "tiny", 1.5, 1.0, True
        args.warmup = min(args.warmup, 2)
    args.sizes = [s for s in args.sizes.split(",") if s]
    args.precisions = [p for p in args.precisions.split(",") if p]
    args.archs = [a for a in args.archs.split(",") if a]
    if bad := [s for s in args.sizes if s not in SIZES]:
        raise BenchError(f"unknown size(s) {', '.join(bad)}; use {', '.join(SIZES)}")
    if bad := [p for p in args.precisions if p not in PRECISIONS]:
        raise BenchError(f"unknown precision(s) {', '.join(bad)}; use fp32, bf16")
    if not args.sizes or not args.precisions:
        raise BenchError("--sizes and --precisions need at least one value each")
    if args.clock == "cpu" and args.threads != 1:
        raise BenchError("--clock cpu needs --threads 1 (other threads' CPU time is not seen)")
    if (args.max_autotune or args.inductor_cache) and not args.compile:
        raise BenchError("--max-autotune and --inductor-cache only apply with --compile")
    if args.threads < 1 or args.seconds <= 0 or args.warmup < 1 or args.min_steps < 1:
        raise BenchError("--threads, --warmup and --min-steps must be >= 1, --seconds > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"] and len(argv) == 2:
        print("RESULT " + json.dumps(worker(json.loads(argv[1]))), flush=True)
        return 0
    try:
        args = parse_args(argv)
        if args.render:
            try:
                payload = json.loads(Path(args.render).read_text())
            except (OSError, ValueError) as e:
                raise BenchError(f"cannot read {args.render}: {e}") from e
            if not isinstance(payload, dict) or "runs" not in payload or "peaks" not in payload:
                raise BenchError(f"{args.render} is not a speed_vs_peers results file")
            print(markdown(payload))
            return 0
        from _common import machine, print_table, write_json

        from memlm import architectures

        if args.profile:
            if args.profile not in set(architectures()) | set(VARIANTS):
                raise BenchError(f"unknown architecture {args.profile!r}")
            print(profile_arch(args.profile, args.sizes[0], args.precisions[0], args.threads))
            return 0
        if args.attention:
            rows = attention_kernels(args.threads)
            print_table(rows, ["dtype", "T", "head_dim", "sdpa_ms", "sdpa_math_ms",
                               "explicit_ms", "fp32_kernel_ms", "memlm_ms"])
            write_json("attention_kernels", {"threads": args.threads, "rows": rows,
                                             "cpu_flags": cpu_flags()})
            return 0
        t0 = time.perf_counter()
        payload = {"machine": {**machine(), "threads": args.threads},
                   "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                   "args": {k: v for k, v in vars(args).items() if k != "worker"},
                   **measure(args)}
        payload["rows"] = summarise(payload)
        payload["wall_s"] = time.perf_counter() - t0
    except BenchError as e:
        print(f"speed_vs_peers: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    table = markdown(payload)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')} in {payload['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
