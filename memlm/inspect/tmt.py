"""`memlm inspect` for TMT: exit layer per token, mesh neighbours, decay half-lives, kNN graph PNG.

The text answers "how deep did each token go, how sure was it, and whom did
it attend to"; `--graph` draws the mesh edges of one layer as arcs over the
sentence (edges to the past arc above the tokens; a leaking `faithful` model's
edges to the future arc below, in red, so the leak is visible at a glance).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from memlm.types import evaluating


def trace_summary(trace: dict[str, Any], n_layer: int) -> dict[str, Any]:
    """Per-layer future-edge fraction and neighbour distance, exit histogram, MACs, half-lives."""
    out: dict[str, Any] = {"mode": trace.get("mode"), "causal": trace.get("causal"), "layers": {}}
    for layer in range(1, n_layer + 1):
        idx = trace.get(f"knn_idx.l{layer}")
        if idx is None:
            continue
        idx = idx.long()
        pos = torch.arange(idx.shape[2], device=idx.device)[None, None, :, None]
        valid = idx >= 0
        n = int(valid.sum())
        dist = (pos - idx).float()[valid]
        out["layers"][layer] = {
            "edges": n,
            "future_edge_frac": float((idx > pos)[valid].float().mean()) if n else 0.0,
            "mean_distance": float(dist.mean()) if n else float("nan"),
            "median_distance": float(dist.median()) if n else float("nan"),
        }
    exit_layer = trace.get("exit_layer")
    if exit_layer is not None:
        counts = torch.bincount(exit_layer.flatten().long(), minlength=n_layer + 1)[1:]
        out["exit_histogram"] = {i + 1: int(c) for i, c in enumerate(counts)}
        out["mean_layers"] = float(exit_layer.float().mean())
    slopes = trace.get("decay_slope")
    if slopes is not None:
        out["half_life"] = [[math.log(2) / s if s > 0 else float("inf") for s in row]
                            for row in slopes.tolist()]
    return out


def _show(tok: str) -> str:
    return tok.replace("\n", "\\n").replace("\t", "\\t")


def inspect_tmt(model, tokens: list[str], ids: torch.Tensor, output, out_dir: Path | None,
                layer: int | None, graph: bool) -> str:
    """Printable report for one sequence (row 0); PNGs into out_dir when given."""
    cfg = model.config
    trace = output.trace if output is not None and output.trace else None
    if trace is None or "exit_layer" not in trace:
        with evaluating(model), torch.no_grad():
            trace = model(ids, trace=True).trace
    n_layer = cfg.n_layer
    if layer is None:  # the deepest layer where some token still issued queries
        traced = [lyr for lyr in range(1, n_layer + 1)
                  if f"knn_idx.l{lyr}" in trace and bool((trace[f"knn_idx.l{lyr}"] >= 0).any())]
        layer = traced[-1] if traced else n_layer
    layer = max(1, min(layer, n_layer))
    summary = trace_summary(trace, n_layer)
    lines = []
    flag = "causal" if summary["causal"] else "LEAKY (non-causal, reads future tokens)"
    shape = ("the original's: kNN over all positions, length-scaled row decay"
             if cfg.attn_mode == "tmt_faithful_leaky" else
             f"window={cfg.mesh_window}  decay={cfg.decay}")
    lines.append(f"TMT  mode={summary['mode']}  {flag}  layers={n_layer}  k={cfg.mesh_k}  {shape}")
    lam = cfg.exit_threshold
    lines.append(f"exit threshold: {'not calibrated (full depth)' if lam is None else lam}   "
                 f"mean layers run: {summary.get('mean_layers', n_layer):.2f} of {n_layer}")
    hist = summary.get("exit_histogram", {})
    lines.append("exit histogram: " + "  ".join(f"L{k}:{v}" for k, v in hist.items()))
    for lyr, info in summary["layers"].items():
        lines.append(f"layer {lyr}: future_edge_frac={info['future_edge_frac']:.3f}  "
                     f"mean neighbour distance={info['mean_distance']:.1f}  "
                     f"median={info['median_distance']:.1f}")
    if "half_life" in summary:
        hl = summary["half_life"][layer - 1]
        lines.append(f"decay half-life (tokens) at layer {layer}, per head: "
                     + " ".join(f"{h:.1f}" for h in hl))
    lines.append("")
    idx = trace.get(f"knn_idx.l{layer}")
    conf = trace["confidence"][:, 0]
    exit_layer = trace["exit_layer"][0]
    lines.append(f"{'pos':>4} {'token':<14} {'exit':>4}  {'confidence per layer':<24} "
                 f"mesh neighbours at layer {layer} (head 0)")
    for t, tok in enumerate(tokens[: ids.shape[1]]):
        cs = " ".join("  - " if math.isnan(c) else f"{c:.2f}" for c in conf[:, t].tolist())
        neigh = ""
        if idx is not None:
            js = [j for j in idx[0, 0, t].tolist() if j >= 0]
            neigh = ", ".join(f"{j}:{_show(tokens[j])!r}" for j in sorted(js)[:8])
            if len(js) > 8:
                neigh += f" (+{len(js) - 8})"
        lines.append(f"{t:>4} {_show(tok)[:14]:<14} {int(exit_layer[t]):>4}  {cs:<24} {neigh}")
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = [plot_exits(tokens, exit_layer, n_layer, out_dir / "tmt_exit_layers.png")]
        if graph and idx is not None:
            paths.append(plot_knn_graph(tokens, idx[0], layer, out_dir / f"tmt_knn_l{layer}.png"))
        lines.append("")
        lines.extend(f"wrote {p}" for p in paths)
    return "\n".join(lines)


def plot_exits(tokens: list[str], exit_layer: torch.Tensor, n_layer: int, path: Path) -> Path:
    """Bar per token: the layer it exited at (n_layer = ran the full depth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = exit_layer.shape[0]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * n), 3), dpi=110)
    ax.bar(range(n), exit_layer.tolist(), color="tab:blue")
    ax.set_xticks(range(n))
    ax.set_xticklabels([_show(t) for t in tokens[:n]], rotation=90, fontsize=7)
    ax.set_ylim(0, n_layer + 0.5)
    ax.set_ylabel("exit layer")
    ax.set_title("TMT: layer at which each token exited")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_knn_graph(tokens: list[str], idx: torch.Tensor, layer: int, path: Path) -> Path:
    """Arcs from each query to its mesh neighbours (idx (H, S, k)); all heads overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Arc

    n_head, n, _ = idx.shape
    fig, ax = plt.subplots(figsize=(max(6, 0.4 * n), 4), dpi=110)
    colors = plt.get_cmap("tab10")
    future = 0
    for h in range(n_head):
        for i in range(n):
            for j in idx[h, i].tolist():
                if j < 0 or j == i:
                    continue
                centre, width = (i + j) / 2, abs(i - j)
                leak = j > i
                future += leak
                ax.add_patch(Arc((centre, 0), width, width * 0.6, theta1=180 if leak else 0,
                                 theta2=360 if leak else 180, lw=0.8, alpha=0.5,
                                 color="red" if leak else colors(h % 10)))
    ax.set_xlim(-1, n)
    ax.set_ylim(-0.35 * n, 0.35 * n)
    ax.set_xticks(range(n))
    ax.set_xticklabels([_show(t) for t in tokens[:n]], rotation=90, fontsize=7)
    ax.set_yticks([])
    note = f"{future} edges to the FUTURE (red, leaking)" if future else "all edges point to the past"
    ax.set_title(f"TMT mesh edges, layer {layer}, {n_head} heads: {note}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
