"""The README.md model card written next to every saved model.

A folder written by `save_pretrained` is a memlm checkpoint and a transformers
checkpoint at once (see memlm/hf.py), so it is often copied around or pushed to
the Hub on its own. The card travels with it and says what is inside: the
architecture, its full config, parameter counts with and without embeddings,
how to load it, and the evaluation numbers of the run it came from.

Evaluation numbers come from `save_pretrained(dir, eval_results={...})`; the
trainer passes its run's latest validation record (memlm/train/run.py,
`eval_results_from_run`) for every checkpoint it writes. The card renderer takes
data only: it knows nothing of run folders. This module is plain Python: writing
a card never imports transformers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

README_NAME = "README.md"


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def render_model_card(
    model: Any,
    eval_results: dict[str, Any] | None = None,
    name: str = "model",
) -> str:
    """Markdown for `model` (a MemLM); `name` is the folder name used in the examples."""
    from memlm import __version__
    from memlm.registry import ARCHITECTURES

    config = model.config.to_dict()
    arch = config["arch"]
    description = ARCHITECTURES.get(arch).description if arch in ARCHITECTURES else ""
    total = model.num_params()
    non_emb = model.num_params(non_embedding=True)
    lines = [
        "---",
        "library_name: transformers",
        f"tags: [memlm, {arch}, causal-lm]",
        "---",
        "",
        f"# {name}: a memlm `{arch}` language model",
        "",
    ]
    if description:
        lines += [f"Architecture `{arch}`: {description}.", ""]
    lines += [
        "| | |",
        "|---|---|",
        f"| parameters | {total:,} |",
        f"| parameters without embeddings | {non_emb:,} |",
        f"| embedding parameters | {total - non_emb:,} |",
        f"| stateful (carries memory between calls) | {'yes' if model.is_stateful else 'no'} |",
        f"| context length | {config['context_len']:,} tokens |",
        f"| vocabulary | {config['vocab_size']:,} tokens |",
        "",
    ]
    if eval_results:
        step = eval_results.get("step")
        title = f"## Evaluation (step {_fmt(step)})" if step is not None else "## Evaluation"
        lines += [title, "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in eval_results.items() if k != "step"]
        lines.append("")
    lines += [
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "",
        "# trust_remote_code runs configuration_memlm.py / modeling_memlm.py from this folder:",
        "# they only import the installed memlm package (pip install memlm)",
        f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)',
        "out = model(input_ids, labels=input_ids)  # labels are shifted inside, as in transformers",
        "new_ids = model.generate(input_ids, max_new_tokens=50, do_sample=False)",
        "",
        "import memlm",
        f'native = memlm.load("{name}")  # the same folder through memlm\'s own API',
        "```",
        "",
        "`model.memlm` is the underlying memlm model. Stateful architectures return their",
        "memory in `out.memory_state`; pass it back as `memory_state=` to continue a stream.",
        "",
        "## Configuration",
        "",
        "```json",
        json.dumps(config, indent=2),
        "```",
        "",
        f"Written by memlm {__version__}.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(
    model: Any,
    path: str | Path,
    eval_results: dict[str, Any] | None = None,
) -> None:
    """Write README.md into the model folder `path` (atomically)."""
    from memlm.io import atomic_write_text

    path = Path(path)
    name = path.name.lstrip(".").removesuffix(".tmp") or "model"
    atomic_write_text(path / README_NAME, render_model_card(model, eval_results or {}, name))
