"""What the DNC memory did on a text: one row per token, plus heatmaps.

    memlm inspect runs/dnc --text "Albert Einstein was born in 1879 in Ulm." --out inspect/

prints, for every token, the write gate as a number and an inline bar (30 blocks =
gate 1), the allocation gate (how much of the write went to the least-used slot
rather than a content match), the slot written most with its weight, the mean free
gate, the slot each read head looked at, and the highest slot usage. With an output
folder it also writes `dnc_inspect.jsonl` (the same rows), `dnc_inspect.txt`, and
heatmaps (tokens x slots) of the write address, each read head and the usage.

Runs from a fresh memory unless the caller passes an output computed from a
carried state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

DEFAULT_PROBE = ("Albert Einstein was born in 1879 in Ulm. "
                 "He developed the theory of relativity.")
BAR_WIDTH = 30


def _shown(token: str, width: int = 16) -> str:
    """Printable token: control characters escaped, long tokens cut."""
    text = token.encode("unicode_escape").decode("ascii")
    return text if len(text) <= width else text[: width - 1] + "~"


def token_rows(tokens: list[str], trace: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per token (batch row 0) with the columns of docs/dnc.md#inspection."""
    gate = trace["write_gate"][0].float()
    alloc = trace["alloc_gate"][0].float()
    free = trace["free_gate"][0].float()
    address = trace["write_address"][0].float()
    read = trace["read_weights"][0].float()  # [T, R, N]
    usage = trace.get("usage")
    rows = []
    for t, token in enumerate(tokens):
        g = float(gate[t])
        slot = int(address[t].argmax())
        rw, rs = read[t].max(-1)
        rows.append({
            "position": t,
            "token": token,
            "gate": round(g, 4),
            "bar": "\u2588" * int(BAR_WIDTH * g),
            "alloc_gate": round(float(alloc[t]), 4),
            "write_slot": slot,
            "write_weight": round(float(address[t, slot]), 4),
            "free": round(float(free[t]), 4),
            "read_slots": [[int(s), round(float(w), 4)] for s, w in zip(rs, rw)],
            "usage_max": None if usage is None else round(float(usage[0, t].max()), 4),
        })
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The text table: token | gate | bar, then the addressing columns."""
    head = (f"  {'Token':<16} {'Gate':>6}  {'bar':<{BAR_WIDTH}}  {'alloc':>5}  "
            f"{'write slot':>12}  {'free':>5}  {'usage':>5}  read slots")
    lines = [head, "  " + "\u2500" * (len(head) + 8)]
    for r in rows:
        reads = " ".join(f"{s}({w:.2f})" for s, w in r["read_slots"])
        usage = "" if r["usage_max"] is None else f"{r['usage_max']:.2f}"
        lines.append(
            f"  {_shown(r['token']):<16} {r['gate']:>6.3f}  {r['bar']:<{BAR_WIDTH}}  "
            f"{r['alloc_gate']:>5.2f}  {r['write_slot']:>5} ({r['write_weight']:.2f})  "
            f"{r['free']:>5.2f}  {usage:>5}  {reads}"
        )
    return "\n".join(lines)


def save_heatmaps(tokens: list[str], trace: dict[str, Any], out_dir: Path) -> list[Path]:
    """PNG heatmaps (tokens x slots): write address, each read head, usage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [_shown(t, 12) for t in tokens]
    panels = [("write address w\u0302", trace["write_address"][0])]
    read = trace["read_weights"][0]
    panels += [(f"read head {r}", read[:, r]) for r in range(read.shape[1])]
    if trace.get("usage") is not None:
        panels.append(("usage u", trace["usage"][0]))
    n = len(panels)
    height = max(3.0, 0.22 * len(tokens) + 1.5)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 1, height), squeeze=False)
    for ax, (title, data) in zip(axes[0], panels):
        im = ax.imshow(data.float().cpu().numpy(), aspect="auto", cmap="viridis",
                       vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("slot")
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels if ax is axes[0][0] else [], fontsize=7)
    fig.colorbar(im, ax=list(axes[0]), fraction=0.02)
    path = out_dir / "dnc_memory.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [path]


@torch.no_grad()
def inspect_dnc(model, tokens: list[str], ids: torch.Tensor, output=None,
                out_dir: Path | None = None, layer: int | None = None,
                graph: bool = False) -> str:
    """The inspector of "dnc" (ArchSpec.inspector). `layer` and `graph` do not apply (one memory)."""
    trace = output.trace if output is not None and output.trace else None
    if trace is None or "write_gate" not in trace or trace.get("usage") is None:
        from memlm.inspect.segments import traced_forward

        output = traced_forward(model, ids)  # windows with the memory carried
        trace = output.trace
    rows = token_rows(tokens, trace)
    text = format_rows(rows)
    m = output.metrics
    summary = "  ".join(f"{k}={float(m['dnc_' + k]):.3f}" for k in
                        ("avg_gate", "write_rate", "write_sparsity", "alloc_share",
                         "read_sparsity", "mem_kl", "slot_diversity") if "dnc_" + k in m)
    from memlm.inspect.health import dnc_health, health_lines

    health = "; ".join(health_lines(dnc_health({k: trace[k][:1] for k in
                                                 ("write_gate", "write_address")})))
    text = f"DNC memory, {len(rows)} tokens: {summary}\n{text}\nmemory health: {health}"
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "dnc_inspect.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps({k: v for k, v in r.items() if k != "bar"}) + "\n")
        (out_dir / "dnc_inspect.txt").write_text(text + "\n")
        save_heatmaps(tokens, trace, out_dir)
    return text
