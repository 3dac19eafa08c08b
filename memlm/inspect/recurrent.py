"""What RMT / ARMT memory did on a text: one row per segment and layer, plus heatmaps.

    memlm inspect runs/armt --text "$(head -c 2000 notes.txt)" --out inspect/

The text is cut into the model's segments (segment_len tokens, its alignment), exactly
as the forward pass cuts it, and every row is one (segment, layer):

* ARMT (one associative memory per layer): the write strength |dA| (Frobenius norm of
  the delta-rule update the segment's memory tokens made to the layer's matrix A), the
  growth of the normaliser |dz| (the gamma-weighted keys), the mean write gate beta and
  new-key share gamma, |A| after the segment, and the mean norm of what the memory read
  added to each text token at that layer's input. Segment 0 reads an empty memory, so
  its read is 0: that is how the memory starts, not a fault.
* RMT (memory tokens around the whole backbone): per layer, the mean hidden-state norm at
  the read block (the memory the segment starts from) and at the write block (what becomes
  the next memory), recorded with forward hooks on the backbone layers; per segment, the
  norms of the memory tokens read and written and how far the write moved them.

With an output folder it writes `<arch>_inspect.txt`, `<arch>_inspect.jsonl` (the rows)
and `<arch>_memory.png` (heatmaps, segments x layers). Runs from a fresh memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from memlm.errors import ConfigError
from memlm.inspect.health import armt_health
from memlm.inspect.health import health_lines as _health_lines
from memlm.types import evaluating

ARMT_COLUMNS = (("write_norm", "write|dA|"), ("z_write", "|dz|"), ("beta", "beta"),
                ("gamma", "gamma"), ("memory_norm", "|A|"), ("read_norm", "read|o|"))
RMT_COLUMNS = (("read_hidden", "read h"), ("write_hidden", "write h"), ("read_mem", "|m| in"),
               ("write_mem", "|m| out"), ("mem_delta", "|dm|"))


def _shown(text: str, width: int) -> str:
    """Printable excerpt: control characters escaped, long text cut."""
    text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= width else text[: width - 1] + "~"


def segment_spans(model: Any, length: int) -> list[tuple[int, int]]:
    """The (start, end) token spans the model's forward pass cuts `length` tokens into."""
    from memlm.models.recurrent import segment_bounds

    return segment_bounds(length, model.segment_len, model.config.segment_alignment)


def _check_layer(layer: int | None, n_layers: int) -> None:
    if layer is not None and not 0 <= layer < n_layers:
        raise ConfigError(f"--layer {layer} is out of range: this model has {n_layers} layers "
                          f"(0..{n_layers - 1}).")


def _run(model: Any, ids: torch.Tensor) -> Any:
    with evaluating(model):
        return model(ids, state=model.init_state(ids.shape[0], ids.device), trace=True)


def _base_row(tokens: list[str], spans, s: int, layer: int) -> dict[str, Any]:
    a, e = spans[s]
    return {"segment": s, "layer": layer, "start": a, "end": e, "text": "".join(tokens[a:e])}


# ----- ARMT -----------------------------------------------------------------------------------
def armt_rows(tokens: list[str], trace: dict[str, Any], spans) -> list[dict[str, Any]]:
    """One dict per (segment, layer) from an ARMT trace (batch row 0)."""
    write = trace["armt_write_norm"][0].float()  # [S, N_L]
    z = trace["armt_z_write"][0].float()
    norm = trace["armt_memory_norm"][0].float()
    beta, gamma = trace.get("armt_beta"), trace.get("armt_gamma")  # [S, N_L] batch means
    read = trace.get("armt_read_norm")  # [B, T, N_L]
    rows = []
    for s in range(write.shape[0]):
        a, e = spans[s]
        for layer in range(write.shape[1]):
            row = _base_row(tokens, spans, s, layer)
            row.update({
                "write_norm": float(write[s, layer]),
                "z_write": float(z[s, layer]),
                "beta": None if beta is None else float(beta[s, layer]),
                "gamma": None if gamma is None else float(gamma[s, layer]),
                "memory_norm": float(norm[s, layer]),
                "read_norm": None if read is None else float(read[0, a:e, layer].float().mean()),
            })
            rows.append(row)
    return rows


# ----- RMT ------------------------------------------------------------------------------------
@torch.no_grad()
def rmt_trace_with_layers(model: Any, ids: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Run RMT with hooks on the backbone layers: (output, norms [S, N_L, 2]).

    Each backbone call is one segment laid out `[read | text | write]`; the hooks take
    the mean hidden-state norm (batch row 0) over the first m positions (read block)
    and the last m (write block) of every layer's output.
    """
    m = model.config.num_mem_tokens
    layers = model.backbone.layers()
    seen: list[list[torch.Tensor]] = [[] for _ in layers]

    def hook(index: int):
        def grab(module, args, output):
            h = (output[0] if isinstance(output, tuple) else output)[0].float()
            seen[index].append(torch.stack([h[:m].norm(dim=-1).mean(),
                                            h[-m:].norm(dim=-1).mean()]))
        return grab

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        out = _run(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    return out, torch.stack([torch.stack(per_layer) for per_layer in seen], dim=1)


def rmt_rows(tokens: list[str], trace: dict[str, Any], spans,
             layer_norms: torch.Tensor) -> list[dict[str, Any]]:
    """One dict per (segment, layer): hidden norms at the memory blocks + memory-token norms."""
    read = trace["rmt_read_norm"][0].float()  # [S, m]
    write = trace["rmt_write_norm"][0].float()
    delta = trace["rmt_write_delta"][0].float()
    rows = []
    for s in range(read.shape[0]):
        for layer in range(layer_norms.shape[1]):
            row = _base_row(tokens, spans, s, layer)
            row.update({
                "read_hidden": float(layer_norms[s, layer, 0]),
                "write_hidden": float(layer_norms[s, layer, 1]),
                "read_mem": float(read[s].mean()),
                "write_mem": float(write[s].mean()),
                "mem_delta": float(delta[s].mean()),
            })
            rows.append(row)
    return rows


# ----- shared output --------------------------------------------------------------------------
def format_rows(rows: list[dict[str, Any]], columns) -> str:
    """The text table: segment, token span, text excerpt, layer, then the value columns."""
    head = f"  {'seg':>3}  {'tokens':>9}  {'text':<20}  {'layer':>5}" + "".join(
        f"  {label:>9}" for _, label in columns)
    lines = [head, "  " + "\u2500" * (len(head) - 2)]
    last = None
    for r in rows:
        first = r["segment"] != last  # span and text once per segment
        last = r["segment"]
        span = f"{r['start']}-{r['end']}" if first else ""
        text = _shown(r["text"], 20) if first else ""
        cells = "".join("  " + (f"{'-':>9}" if r[key] is None else f"{r[key]:>9.4f}")
                        for key, _ in columns)
        lines.append(f"  {r['segment'] if first else '':>3}  {span:>9}  {text:<20}  "
                     f"{r['layer']:>5}{cells}")
    return "\n".join(lines)


def save_heatmaps(panels: list[tuple[str, str, torch.Tensor]], path: Path) -> Path:
    """One heatmap per (title, x label, matrix [segments, columns]), values written in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    rows = panels[0][2].shape[0]
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n + 1, max(2.6, 0.45 * rows + 1.6)),
                             squeeze=False)
    for ax, (title, xlabel, data) in zip(axes[0], panels):
        values = data.float().cpu().numpy()
        im = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("segment")
        ax.set_xticks(range(values.shape[1]))
        ax.set_yticks(range(values.shape[0]))
        if values.size <= 144:  # small grids: print each value in its cell
            for (i, j), v in ((ij, values[ij]) for ij in
                              ((i, j) for i in range(values.shape[0])
                               for j in range(values.shape[1]))):
                bright = (v - values.min()) > 0.6 * (values.max() - values.min() + 1e-12)
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7,
                        color="k" if bright else "w")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _write(out_dir: Path | None, arch: str, text: str, rows: list[dict[str, Any]],
           panels: list[tuple[str, str, torch.Tensor]]) -> None:
    if out_dir is None:
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{arch}_inspect.txt").write_text(text + "\n")
    with open(out_dir / f"{arch}_inspect.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    save_heatmaps(panels, out_dir / f"{arch}_memory.png")


def _header(model: Any, name: str, ids: torch.Tensor, spans) -> str:
    c = model.config
    return (f"{name} memory: {ids.shape[1]} tokens in {len(spans)} segment(s) of "
            f"segment_len {c.segment_len}, {len(model.backbone.layers())} layers, "
            f"{c.num_mem_tokens} memory tokens")


@torch.no_grad()
def inspect_armt(model, tokens: list[str], ids: torch.Tensor, output=None,
                 out_dir: Path | None = None, layer: int | None = None,
                 graph: bool = False) -> str:
    """The inspector of "armt" (ArchSpec.inspector). `layer` keeps one layer's rows; `graph` does not apply."""
    n_layers = len(model.backbone.layers())
    _check_layer(layer, n_layers)
    trace = output.trace if output is not None and output.trace else None
    if trace is None or "armt_write_norm" not in trace:
        trace = _run(model, ids).trace
    spans = segment_spans(model, ids.shape[1])
    rows = armt_rows(tokens, trace, spans)
    shown = [r for r in rows if layer is None or r["layer"] == layer]
    health = "; ".join(_health_lines(armt_health(trace)))  # write gate level per layer
    text = "\n".join([
        _header(model, "ARMT", ids, spans) + f"; memory health: {health}",
        "  write|dA|: size of the delta-rule update written into the layer's matrix A; "
        "|dz|: growth of its normaliser;",
        "  beta: write gate; gamma: share of each key new to z; |A|: matrix norm after the "
        "segment;",
        "  read|o|: mean norm the memory read added to the segment's tokens (0 in segment 0: "
        "the memory starts empty)",
        format_rows(shown, ARMT_COLUMNS),
    ])

    s = trace["armt_write_norm"][0]
    panels = [("write strength |dA|", "layer", s),
              ("memory norm |A| after segment", "layer", trace["armt_memory_norm"][0])]
    if "armt_read_norm" in trace:
        read = torch.stack([trace["armt_read_norm"][0, a:e].float().mean(0) for a, e in spans])
        panels.insert(1, ("read norm added to tokens", "layer", read))
    _write(out_dir, "armt", text, rows, panels)
    return text


@torch.no_grad()
def inspect_rmt(model, tokens: list[str], ids: torch.Tensor, output=None,
                out_dir: Path | None = None, layer: int | None = None,
                graph: bool = False) -> str:
    """The inspector of "rmt" (ArchSpec.inspector). Always re-runs the text (the hooks need a forward)."""
    n_layers = len(model.backbone.layers())
    _check_layer(layer, n_layers)
    out, layer_norms = rmt_trace_with_layers(model, ids)
    spans = segment_spans(model, ids.shape[1])
    rows = rmt_rows(tokens, out.trace, spans, layer_norms)
    shown = [r for r in rows if layer is None or r["layer"] == layer]
    text = "\n".join([
        _header(model, "RMT", ids, spans),
        "  read h / write h: mean hidden-state norm at the read / write memory block after "
        "each layer;",
        "  |m| in / |m| out: mean norm of the memory tokens read / written; |dm|: how far the "
        "write moved them",
        format_rows(shown, RMT_COLUMNS),
    ])
    panels = [("write-block hidden norm", "layer", layer_norms[:, :, 1]),
              ("read-block hidden norm", "layer", layer_norms[:, :, 0]),
              ("written memory token norm", "memory token", out.trace["rmt_write_norm"][0]),
              ("memory change |dm| per token", "memory token", out.trace["rmt_write_delta"][0])]
    _write(out_dir, "rmt", text, rows, panels)
    return text
