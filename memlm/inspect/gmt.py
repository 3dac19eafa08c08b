"""Which memory slots a GMT used for a text probe (`memlm inspect RUN --text ...`).

Every block routes each token from a *source* slot (nearest centroids) to a
*target* slot (graph prior x query); the displacement between them is what the
block adds to the residual stream. This module turns a `trace=True` forward
into:

* a fixed-width table, one row per token: `src->tgt (p_src/p_tgt)` per block;
* a per-block summary: unique slots, self-routes, probe N_eff, Gini coefficient of
  the source-slot counts, top slots with example tokens, and a collapse warning
  when one slot takes more than half of the tokens (docs/gmt.md#routing-inspection-records);
* records (one per token and block) as JSON Lines, and PNGs: the slot path of the
  sentence, and with `graph=True` the usage bar chart, the transition heatmap
  A = softmax(E) and the edge list of the chosen block.

Blocks are numbered 1..L here, as in docs/gmt.md; `layer` picks one of them (default:
the last block).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from memlm.errors import ConfigError

#: top-1 share above which a block is reported as collapsed onto one slot
COLLAPSE_SHARE = 0.5


def gini(counts: list[int] | torch.Tensor) -> float:
    """sum_i sum_j |c_i - c_j| / (2 K sum c): 0 = even use, 1 - 1/K = one slot takes all."""
    c = torch.as_tensor(counts, dtype=torch.float64)
    total = float(c.sum())
    if total == 0:
        return 0.0
    return float((c[:, None] - c[None, :]).abs().sum() / (2 * c.numel() * total))


def _entropy(p: torch.Tensor) -> float:
    return float(-(p * torch.log(p.clamp_min(1e-12))).sum())


def _top3(p: torch.Tensor) -> list[tuple[int, float]]:
    values, idx = torch.topk(p, min(3, p.numel()))
    return [(int(i), round(float(v), 4)) for v, i in zip(values, idx)]


def routing_records(trace: dict[str, Any], tokens: list[str], row: int = 0) -> list[dict]:
    """One record per (token, block) with the fields of docs/gmt.md#routing-inspection-records."""
    src, tgt = trace["src_probs"][row].float(), trace["tgt_probs"][row].float()  # [T, L, K]
    t_len, n_layer, _ = src.shape
    records = []
    for t in range(t_len):
        for layer in range(n_layer):
            ps, pt = src[t, layer], tgt[t, layer]
            s_slot, g_slot = int(ps.argmax()), int(pt.argmax())
            records.append({
                "token": tokens[t] if t < len(tokens) else "",
                "position": t,
                "block": layer + 1,
                "src_slot": s_slot,
                "src_prob": float(ps[s_slot]),
                "src_entropy": _entropy(ps),
                "src_top3": _top3(ps),
                "tgt_slot": g_slot,
                "tgt_prob": float(pt[g_slot]),
                "tgt_entropy": _entropy(pt),
                "tgt_top3": _top3(pt),
                "self_route": s_slot == g_slot,
                "disp_norm": float(trace["disp_norm"][row, t, layer]),
                "graph_influence": float(trace["graph_influence"][row, t, layer]),
            })
    return records


def block_summaries(trace: dict[str, Any], tokens: list[str], row: int = 0) -> list[dict]:
    """Per-block probe summary: slot counts, N_eff, Gini, top slots, collapse warning."""
    src, tgt = trace["src_probs"][row].float(), trace["tgt_probs"][row].float()
    t_len, n_layer, k = src.shape
    out = []
    for layer in range(n_layer):
        s_arg, t_arg = src[:, layer].argmax(-1), tgt[:, layer].argmax(-1)
        s_counts = torch.bincount(s_arg, minlength=k)
        t_counts = torch.bincount(t_arg, minlength=k)
        mean_src = src[:, layer].mean(0)
        src_share = float(s_counts.max()) / t_len
        tgt_share = float(t_counts.max()) / t_len
        top_src = []
        for slot in torch.argsort(s_counts, descending=True)[:5].tolist():
            if s_counts[slot] == 0:
                break
            examples = [tokens[t] for t in range(t_len) if int(s_arg[t]) == slot][:4]
            top_src.append({"slot": slot, "count": int(s_counts[slot]), "tokens": examples})
        top_tgt = [{"slot": s, "count": int(t_counts[s])}
                   for s in torch.argsort(t_counts, descending=True)[:5].tolist() if t_counts[s]]
        out.append({
            "block": layer + 1,
            "unique_src": int((s_counts > 0).sum()),
            "unique_tgt": int((t_counts > 0).sum()),
            "self_routes": int((s_arg == t_arg).sum()),
            "probe_n_eff": math.exp(_entropy(mean_src)),
            "gini": gini(s_counts),
            "src_top1_share": src_share,
            "tgt_top1_share": tgt_share,
            "top_src": top_src,
            "top_tgt": top_tgt,
            "collapse": src_share > COLLAPSE_SHARE or tgt_share > COLLAPSE_SHARE,
        })
    return out


def _show(token: str, width: int) -> str:
    text = token.encode("unicode_escape").decode("ascii")
    return text if len(text) <= width else text[: width - 1] + "~"


def routing_table(trace: dict[str, Any], tokens: list[str], row: int = 0) -> str:
    """token | per block: src->tgt (p_src/p_tgt), one line per token."""
    n_layer = trace["src_slot"].shape[2]
    col = 18
    head = f"{'pos':>4} {'token':<12}|" + "|".join(f"{'block ' + str(i + 1):^{col}}"
                                                   for i in range(n_layer))
    lines = [head, "-" * len(head)]
    for t in range(trace["src_slot"].shape[1]):
        cells = []
        for layer in range(n_layer):
            s, g = int(trace["src_slot"][row, t, layer]), int(trace["tgt_slot"][row, t, layer])
            ps, pt = float(trace["src_prob"][row, t, layer]), float(trace["tgt_prob"][row, t, layer])
            cells.append(f"{f'{s}->{g} ({ps:.2f}/{pt:.2f})':^{col}}")
        token = tokens[t] if t < len(tokens) else ""
        lines.append(f"{t:>4} {_show(token, 12):<12}|" + "|".join(cells))
    return "\n".join(lines)


def summary_text(summaries: list[dict]) -> str:
    lines = []
    for s in summaries:
        top = ", ".join(f"{e['slot']}x{e['count']} {e['tokens']}" for e in s["top_src"][:3])
        lines.append(
            f"block {s['block']}: {s['unique_src']} source / {s['unique_tgt']} target slots, "
            f"{s['self_routes']} self-routes, probe N_eff {s['probe_n_eff']:.1f}, "
            f"Gini {s['gini']:.2f}; top sources {top}")
        if s["collapse"]:
            lines.append(
                f"  WARNING block {s['block']} collapsed: one slot takes "
                f"{max(s['src_top1_share'], s['tgt_top1_share']):.0%} of the tokens "
                f"(source {s['src_top1_share']:.0%}, target {s['tgt_top1_share']:.0%})")
    return "\n".join(lines)


# ----- pictures -------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_usage(usage: torch.Tensor, block: int, path: Path) -> None:
    """Bar chart of the usage EMA of one block's slots (dead slots sit near zero)."""
    fig = _figure(8, 3)
    ax = fig.add_subplot()
    ax.bar(range(usage.numel()), usage.float().cpu().numpy(), color="tab:blue")
    ax.axhline(1.0 / usage.numel(), color="gray", ls="--", lw=0.8, label="uniform 1/K")
    ax.set(xlabel="slot", ylabel="usage EMA", title=f"GMT block {block}: slot usage")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_transitions(edges: torch.Tensor, block: int, path: Path) -> None:
    """Heatmap of A = softmax(E) (row: from slot, column: to slot; the diagonal is 0)."""
    fig = _figure(6, 5)
    ax = fig.add_subplot()
    im = ax.imshow(edges.float().cpu().numpy(), cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax, label="transition probability")
    ax.set(xlabel="to slot", ylabel="from slot", title=f"GMT block {block}: edge matrix A")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_path(trace: dict[str, Any], tokens: list[str], block: int, path: Path,
              row: int = 0) -> None:
    """The sentence as a path over slots: source slot per token, arrow to its target slot."""
    src = trace["src_slot"][row, :, block - 1].cpu().numpy()
    tgt = trace["tgt_slot"][row, :, block - 1].cpu().numpy()
    t_len = len(src)
    fig = _figure(max(6.0, 0.35 * t_len), 4)
    ax = fig.add_subplot()
    ax.plot(range(t_len), src, "-o", color="tab:blue", ms=4, lw=1, label="source slot")
    ax.plot(range(t_len), tgt, "^", color="tab:red", ms=5, label="target slot")
    for t in range(t_len):
        ax.annotate("", xy=(t, tgt[t]), xytext=(t, src[t]),
                    arrowprops={"arrowstyle": "->", "color": "tab:gray", "lw": 0.7})
    ax.set_xticks(range(t_len))
    ax.set_xticklabels([_show(tokens[t] if t < len(tokens) else "", 8) for t in range(t_len)],
                       rotation=90, fontsize=7)
    ax.set(ylabel="slot", title=f"GMT block {block}: slot path of the probe")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def export_graph(edges: torch.Tensor, trace: dict[str, Any], tokens: list[str], block: int,
                 out_dir: Path, row: int = 0) -> None:
    """A as safetensors, plus each slot's top-5 successors and the tokens routed to it."""
    from safetensors.torch import save_file

    save_file({"A": edges.float().contiguous().cpu()}, str(out_dir / f"gmt_edges_block{block}.safetensors"))
    src = trace["src_slot"][row, :, block - 1].tolist()
    lines = []
    for slot in range(edges.shape[0]):
        probs, succ = torch.topk(edges[slot].float(), min(5, edges.shape[0]))
        routed = [tokens[t] for t, s in enumerate(src) if s == slot and t < len(tokens)][:6]
        nxt = ", ".join(f"{int(j)}:{float(p):.3f}" for p, j in zip(probs, succ))
        lines.append(f"slot {slot:>3} -> {nxt}   tokens {routed}")
    (out_dir / f"gmt_edges_block{block}.txt").write_text("\n".join(lines) + "\n")


# ----- the inspector ---------------------------------------------------------------------------
def _resolve_block(layer: int | None, n_layer: int) -> int:
    if layer is None:
        return n_layer
    block = n_layer + 1 + layer if layer < 0 else layer
    if not 1 <= block <= n_layer:
        raise ConfigError(
            f"--layer {layer} is out of range: GMT blocks are numbered 1..{n_layer} "
            "(negative values count from the last block).")
    return block


def inspect_gmt(model, tokens: list[str], ids: torch.Tensor, output: Any,
                out_dir: Path | None = None, layer: int | None = None,
                graph: bool = False) -> str:
    """Printable routing table + block summaries; files into `out_dir` when given."""
    trace = getattr(output, "trace", None)
    if not trace or "src_probs" not in trace:
        from memlm.inspect.segments import traced_forward

        trace = traced_forward(model, ids).trace  # one window at a time past context_len
    n_layer = trace["src_slot"].shape[2]
    block = _resolve_block(layer, n_layer)
    summaries = block_summaries(trace, tokens)
    from memlm.inspect.health import gmt_health, health_lines

    health = gmt_health({k: trace[k][:1] for k in ("src_probs", "tgt_probs")})
    text = (routing_table(trace, tokens) + "\n\n" + summary_text(summaries)
            + "\nmemory health (fraction of slots never the top source / target slot, the "
              "busiest slot's share of tokens):\n  " + "\n  ".join(health_lines(health)))
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "gmt_routing.jsonl", "w") as f:
            for rec in routing_records(trace, tokens):
                f.write(json.dumps(rec) + "\n")
        (out_dir / "gmt_blocks.json").write_text(json.dumps(summaries, indent=1) + "\n")
        written = ["gmt_routing.jsonl", "gmt_blocks.json", f"gmt_path_block{block}.png"]
        plot_path(trace, tokens, block, out_dir / f"gmt_path_block{block}.png")
        if graph:
            plot_usage(trace["usage"][block - 1], block, out_dir / f"gmt_usage_block{block}.png")
            plot_transitions(trace["edges"][block - 1], block,
                             out_dir / f"gmt_transitions_block{block}.png")
            export_graph(trace["edges"][block - 1], trace, tokens, block, out_dir)
            written += [f"gmt_usage_block{block}.png", f"gmt_transitions_block{block}.png",
                        f"gmt_edges_block{block}.safetensors", f"gmt_edges_block{block}.txt"]
        text += f"\n\nwrote {', '.join(written)} to {out_dir}"
    return text
