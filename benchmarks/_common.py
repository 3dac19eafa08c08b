"""Helpers shared by the benchmarks: result tables, JSON output, matmul peak, qa1 text."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
SHARED_DATA = Path(os.environ.get("MEMLM_SHARED_DATA",
                                  Path(__file__).resolve().parents[2] / "shared" / "data"))

_QA1_MOVE = re.compile(r"^\s*(\w+) (?:\w+ )+?to the (\w+)\.?\s*$")  # "Mary went back to the office."


def qa1_move(fact: str) -> tuple[str, str] | None:
    """(person, place) of a qa1 statement, None for any other sentence."""
    m = _QA1_MOVE.match(fact)
    return None if m is None else (m.group(1), m.group(2))


def qa1_asked(question: str) -> str:
    """The person a qa1 question asks about: "Where is Mary?" -> "Mary"."""
    return question.rstrip(" ?").split()[-1]


def rows_spec(source: str, drop: tuple[str, ...] = ("min_segments",), babi: str | None = None) -> str:
    """A run's `data.source` as the spec of fixed-layout evaluation rows.

    The options in `drop` come out (a run trained with `min_segments` drew shorter rows too;
    the scripts that split or probe want every row at exactly the length they ask for), and
    `babi` points at a bAbI folder unless the spec already names one.
    """
    for key in drop:
        source = re.sub(rf":{key}=[\w.]+", "", source)
    if babi and ":babi=" not in source:
        source += f":babi={babi}"
    return source


def machine() -> dict[str, Any]:
    """What the numbers were measured on, including how busy the machine was."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
        info["cpu_count"] = os.cpu_count()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def emit_row(row: dict[str, Any], out: Path | None = None) -> None:
    """Print `row` as one JSON line and append the line to `out` (when given): the probes'
    output, so rows of several runs collect in one JSONL file."""
    line = json.dumps(row)
    print(line)
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def load_average() -> float:
    """1-minute load average (0.0 where the OS does not report one)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def matmul_peak(dtype: torch.dtype, device: str = "cpu", n: int | tuple[int, ...] = (512, 1024),
                seconds: float = 1.0, clock: Any = time.perf_counter) -> float:
    """Measured dense matmul FLOP/s for `dtype` on this machine, right now.

    The peak is the fastest of `a @ b` and `F.linear(a, b)` (nn.Linear's kernel) over
    the square sizes `n`: on some CPUs the two dispatch to different libraries and
    differ by 10x in bf16 (MKL's emulated bf16 GEMM vs oneDNN). Each candidate is
    timed call by call for about `seconds / len(candidates)` and scored by its median
    call, so a stall caused by other processes does not drag the whole estimate down.
    `clock` = `time.thread_time` times the calling thread's CPU time instead (one thread).
    """
    sizes = (n,) if isinstance(n, int) else tuple(n)
    ops = {"mm": lambda a, b: a @ b, "linear": torch.nn.functional.linear}
    budget = seconds / (len(sizes) * len(ops))
    best = 0.0
    for size in sizes:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        for op in ops.values():
            op(a, b)  # warm-up: library initialisation, packing buffers
            times: list[float] = []
            t_end = time.perf_counter() + budget
            while time.perf_counter() < t_end or len(times) < 3:
                t0 = clock()
                op(a, b)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(clock() - t0)
            times.sort()
            best = max(best, 2 * size**3 / times[len(times) // 2])
    return best


def flops_per_token(model: Any, seq_len: int) -> float:
    """Training FLOPs per token: 6 * N + 12 * n_layer * T * d_model.

    N counts the non-embedding parameters plus the LM-head matmul (tied or not, the
    head is a d_model x vocab GEMM every token pays); the second term is the attention
    score and value products (counted over the full window, as nanoGPT and PaLM do).
    """
    c = model.config
    n = model.num_params(non_embedding=True) + c.d_model * c.vocab_size
    return 6.0 * n + 12.0 * c.n_layer * seq_len * c.d_model


def time_with_peak(make: Any, length: int, warm_length: int, reps: int) -> dict[str, float]:
    """Median seconds of `make(length)()` over `reps` runs and the peak RSS it added (MB).

    `make(warm_length)()` runs first so that loading kernels and libraries is not counted in
    the memory baseline; the first full-size run is a warm-up that also sets the peak. With
    `reps=0` the warm-up's own time is reported.
    """
    import resource

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB

    make(warm_length)()
    run = make(length)
    base = peak_mb()
    t = time.perf_counter()
    run()
    first = time.perf_counter() - t
    peak = peak_mb() - base
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return {"time_s": statistics.median(times) if times else first, "peak_mb": peak,
            "reps": len(times)}


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:,.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
        return str(v)

    widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in columns}
    lines = [" | ".join(c.ljust(widths[c]) for c in columns),
             "-+-".join("-" * widths[c] for c in columns)]
    lines += [" | ".join(fmt(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    text = "\n".join(lines)
    print(text)
    return text


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"machine": machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path


def run_cli(main: Callable[[list[str] | None], int], script: str,
            argv: list[str] | None = None) -> int:
    """`main(argv)` with memlm's bad-input rule: a `MemlmError` becomes one line naming the
    problem, `SCRIPT: error: ...`, and exit status 2 instead of a traceback."""
    from memlm.errors import MemlmError

    try:
        return main(argv)
    except MemlmError as e:
        print(f"{script}: error: {e}", file=sys.stderr)
        return 2
