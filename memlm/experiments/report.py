"""One self-contained HTML page for a comparison folder (`memlm report`).

Everything is inline (images as base64 data URIs, CSS in a <style> block), so
the file can be mailed or attached to an issue and opens anywhere offline. The
page shows the comparison table with confidence intervals, the overlaid
training curves and, for each architecture, what its memory did on a sample
sentence (the pictures its inspector draws).
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path
from typing import Any

from memlm.inspect.fmt import sig3

SAMPLE_TEXT = "the code of mia is 4821. ben went to the park. what is the code of mia? 4821."

CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 1.5em auto;
       max-width: 1220px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .88em; }
th, td { border: 1px solid #ccc; padding: .3em .5em; text-align: right; white-space: nowrap; }
td.wrap, th.wrap { white-space: normal; text-align: left; }
tr.win td { background: #eef8f0; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.better { color: #0a7a2f; font-weight: 600; } .worse { color: #b3261e; }
img { max-width: 100%; border: 1px solid #eee; margin: .4em 0; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: .8em; }
.note { color: #555; font-size: .9em; }
"""

#: metrics where a lower value is better (for colouring deltas)
LOWER_IS_BETTER = {"val_nll", "val_ppl", "val_bits_per_token", "val_mean_rank", "wall_s"}


def safe_name(name: object) -> str:
    """`name` as one harmless path component: results.json is data, not a path.

    An architecture named "../../x" must not make the report write outside its folder,
    so anything but letters, digits, '.', '-' and '_' becomes '_' and leading dots go.
    """
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", str(name)).lstrip(".")
    return cleaned[:100] or "_"


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return sig3(v)
    return html.escape(str(v))


def _table(payload: dict[str, Any], keys: list[str]) -> str:
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["arch", "params", *keys])
    rows = []
    for row in payload["rows"]:
        cells = [f"<td>{html.escape(row['arch'])}</td>", f"<td>{row['params']:,}</td>"]
        for key in keys:
            m = row["metrics"].get(key)
            if m is None:
                cells.append("<td>n/a</td>")
                continue
            text = _fmt(m["mean"])
            if isinstance(m.get("ci95"), float) and math.isfinite(m["ci95"]):
                text += f" ± {_fmt(m['ci95'])}"
            delta = m.get("delta_vs_baseline")
            if isinstance(delta, float) and math.isfinite(delta):
                good = (delta < 0) == (key in LOWER_IS_BETTER)
                cls = "better" if good and delta != 0 else "worse" if delta != 0 else ""
                text += f' <span class="{cls}">({sig3(delta, signed=True)})</span>'
            cells.append(f"<td>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _string_table(spec: dict[str, Any], wrap_last: bool = False,
                  highlight: str | None = None) -> str:
    """A table given as {"columns": [...], "rows": [[str, ...], ...]} (already formatted)."""
    last = len(spec["columns"]) - 1
    head = "".join(f"<th{' class=wrap' if wrap_last and i == last else ''}>"
                   f"{html.escape(str(c))}</th>" for i, c in enumerate(spec["columns"]))
    body = []
    for cells in spec["rows"]:
        tds = []
        for i, c in enumerate(cells):
            cls = " class='wrap'" if wrap_last and i == len(cells) - 1 else ""
            tds.append(f"<td{cls}>{html.escape(str(c))}</td>")
        win = " class='win'" if highlight and highlight in str(cells[-1]) else ""
        body.append(f"<tr{win}>" + "".join(tds) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _health_table(health: dict[str, dict[str, float]]) -> str:
    """One row per architecture with a memory to check: its health numbers, per layer."""
    from memlm.inspect.health import health_lines

    rows = [[arch, "; ".join(health_lines(h))] for arch, h in health.items() if h]
    if not rows:
        return ""
    return _string_table({"columns": ["arch", "memory health on held-out text"], "rows": rows},
                         wrap_last=True)


def _inspect_arch(run_dir: Path, out_dir: Path, text: str) -> tuple[str, list[Path]]:
    """Run the architecture's inspector on `text`; return its printout and pictures."""
    import torch

    from memlm.registry import INSPECTORS
    from memlm.train.run import load_run

    model, tokenizer = load_run(run_dir)
    model.eval()
    if model.config.arch not in INSPECTORS:
        return "(this architecture has no memory to inspect)", []
    from memlm.inspect.segments import traced_forward

    ids = torch.tensor([tokenizer.encode(text)])
    out = traced_forward(model, ids)  # the whole text: windows, memory carried where it is
    out_dir.mkdir(parents=True, exist_ok=True)
    before = set(out_dir.glob("*.png"))
    printout = INSPECTORS.get(model.config.arch)(
        model, tokenizer.token_strings(ids[0].tolist()), ids, out, out_dir, None, True)
    pictures = sorted(set(out_dir.glob("*.png")) - before) or sorted(out_dir.glob("*.png"))
    return printout, pictures


def write_report(cmp_dir: str | Path, out_path: str | Path | None = None,
                 sample_text: str = SAMPLE_TEXT, title: str = "memlm comparison") -> Path:
    """Write the report of a comparison folder; return its path.

    Uses the folder's results.json. Prebuilt tables (`verdict_table`, `comparison_table`,
    `memory_health`, written by `memlm demo`) are shown as they are; otherwise the
    metrics are tabulated. `results.json["inspect"]["text"]`, when present, replaces
    `sample_text` as the text each architecture's memory is inspected on.
    """
    cmp_dir = Path(cmp_dir)
    results_path = cmp_dir / "results.json"
    if not results_path.exists():
        from memlm.errors import DataError

        raise DataError(f"{results_path} not found: run `memlm compare ... --out {cmp_dir}` "
                        "(or `memlm demo`) first.")
    payload = json.loads(results_path.read_text())
    keys: list[str] = []
    for row in payload["rows"]:
        for k in row["metrics"]:
            if k not in keys:
                keys.append(k)
    preferred = ["val_nll", "val_ppl", "recall_near", "recall_far", "val_top1",
                 "tokens_per_sec", "wall_s"]
    shown = [k for k in preferred if k in keys] + [
        k for k in keys if k not in preferred and not k.startswith("val_") and k != "n_near"
        and k != "n_far"]
    parts = [f"<h1>{html.escape(title)}</h1>"]
    setup = payload.get("setup", {})
    parts.append(
        "<p class='note'>Same data, token budget and seeds for every architecture; "
        f"baseline: <b>{html.escape(payload.get('baseline', ''))}</b>; seeds: "
        f"{html.escape(str(setup.get('seeds')))}; data: "
        f"{html.escape(str(setup.get('data', {}).get('source')))}. Cells are mean ± 95% CI "
        "over seeds (no interval with one seed), with the change against the baseline.</p>")
    if payload.get("verdict_table", {}).get("rows"):
        vt = payload["verdict_table"]
        parts.append("<h2>Verdict</h2>" + _string_table(vt, highlight="beats the baseline")
                     + "".join(f"<p class='note'>{html.escape(n)}</p>" for n in vt["notes"]))
    elif payload.get("verdict"):
        parts.append("<h2>Verdict</h2><pre>" + html.escape(payload["verdict"]) + "</pre>")
    if payload.get("comparison_table"):
        parts.append("<h2>Comparison</h2>" + _string_table(payload["comparison_table"]))
    else:
        parts.append("<h2>Comparison</h2>" + _table(payload, shown))
    if payload.get("memory_health"):
        parts.append("<h2>Memory health</h2><p class='note'>Counted on held-out text: slots never "
                     "used and the busiest slot's share show a collapsed memory that a mean "
                     "hides.</p>" + _health_table(payload["memory_health"]))
    if (cmp_dir / "curves.png").exists():
        parts.append("<h2>Training curves</h2>" + _img(cmp_dir / "curves.png"))
    extra_pngs = sorted(p for p in cmp_dir.glob("*.png") if p.name != "curves.png")
    for p in extra_pngs:
        parts.append(f"<h3>{html.escape(p.stem)}</h3>" + _img(p))
    sample_text = payload.get("inspect", {}).get("text", sample_text)
    about = payload.get("inspect", {}).get("about", "")
    parts.append("<h2>What the memory did</h2><p class='note'>Sample text: "
                 f"<code>{html.escape(sample_text)}</code>{html.escape(about)}</p>")
    for row in payload["rows"]:
        if not row.get("runs"):
            continue
        run_dir = Path(row["runs"][0])
        if not run_dir.is_absolute() and not run_dir.exists():
            run_dir = cmp_dir / run_dir
        parts.append(f"<h3>{html.escape(row['arch'])}</h3>")
        try:
            printout, pictures = _inspect_arch(run_dir, cmp_dir / "inspect" / safe_name(row["arch"]),
                                               sample_text)
        except Exception as e:  # a broken run must not hide the rest of the report
            parts.append(f"<p class='worse'>inspection failed: {html.escape(str(e))}</p>")
            continue
        parts.append("<pre>" + html.escape(printout[:6000]) + "</pre>")
        parts.extend(_img(p) for p in pictures)
    doc = ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
           f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
           + "\n".join(parts) + "</body></html>")
    out_path = Path(out_path) if out_path else cmp_dir / "report.html"
    out_path.write_text(doc, encoding="utf-8")
    return out_path
