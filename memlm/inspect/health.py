"""Memory-health numbers that cannot hide a collapsed memory.

A memory that works on paper can be dead in practice: GMT routing every token to
one or two slots while most slots are never chosen, a DNC writing into the same slot
over and over, an ARMT whose write gate has closed. A mean over slots ("dead = 0")
hides this; these numbers count what each slot actually did on held-out text:

* GMT, per layer: the fraction of slots that are never the top source slot of any
  token, likewise for the target slot, and the share of tokens the busiest source /
  target slot takes (1/K is even use; near 1 is collapse).
* DNC: how many slots were the top write slot of any token, the share of the total
  write weight (gate x address) that went to the most-written slot, the mean write gate.
* ARMT, per layer: the mean write gate beta (how strongly segments update the
  associative matrix; near 0 means nothing is written) and the write strength |dA|.
* RMT: the mean change of the memory tokens per segment, 1 - cos(new, old).

`memory_health(model, ids)` reads `ids` [B, T] (B independent held-out episodes) from
a fresh memory, windows carried as in `traced_forward`, and returns a flat dict of
floats (`health_*` keys, one per layer where it is per layer) or {} for a model with no
memory to check. The demo writes it to each run's metrics.jsonl, results.json and the
report; `memlm inspect` prints the same numbers for its text.
"""

from __future__ import annotations

from typing import Any

import torch

from memlm.inspect.segments import traced_forward
from memlm.registry import HEALTH


def gmt_health(trace: dict[str, Any]) -> dict[str, float]:
    src, tgt = trace["src_probs"].float(), trace["tgt_probs"].float()  # [B, T, L, K]
    n_layer, k = src.shape[2], src.shape[3]
    out: dict[str, float] = {}
    for layer in range(n_layer):
        for name, probs in (("src", src), ("tgt", tgt)):
            top = probs[:, :, layer].argmax(-1).flatten()
            counts = torch.bincount(top, minlength=k)
            out[f"health_gmt_never_{name}_l{layer + 1}"] = float((counts == 0).sum()) / k
            out[f"health_gmt_top_{name}_share_l{layer + 1}"] = float(counts.max()) / top.numel()
    return out


def dnc_health(trace: dict[str, Any]) -> dict[str, float]:
    gate = trace["write_gate"].float()  # [B, T]
    address = trace["write_address"].float()  # [B, T, N]
    n = address.shape[-1]
    mass = (gate[..., None] * address).sum(dim=(0, 1))  # write weight per slot
    top = address.argmax(-1).flatten()
    return {
        "health_dnc_slots_written": float((torch.bincount(top, minlength=n) > 0).sum()) / n,
        "health_dnc_top_write_share": float(mass.max() / mass.sum().clamp_min(1e-12)),
        "health_dnc_write_gate": float(gate.mean()),
    }


def armt_health(trace: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    beta, write = trace.get("armt_beta"), trace["armt_write_norm"].float()  # [S, L], [B, S, L]
    for layer in range(write.shape[-1]):
        if beta is not None:
            out[f"health_armt_write_gate_l{layer + 1}"] = float(beta[:, layer].float().mean())
        out[f"health_armt_write_norm_l{layer + 1}"] = float(write[..., layer].mean())
    return out


def rmt_health(output: Any) -> dict[str, float]:
    stats = output.metrics
    return ({"health_rmt_mem_change": float(stats["rmt_mem_change"])}
            if "rmt_mem_change" in stats else {})


# ----- the readers architectures declare (ArchSpec.health): traced output -> numbers ----------


def gmt_output_health(output: Any) -> dict[str, float]:
    return gmt_health(output.trace)


def dnc_output_health(output: Any) -> dict[str, float]:
    return dnc_health(output.trace)


def armt_output_health(output: Any) -> dict[str, float]:
    return armt_health(output.trace)


@torch.no_grad()
def memory_health(model: Any, ids: torch.Tensor) -> dict[str, float]:
    """Health numbers of the model's memory on `ids` [B, T] (see the module docstring).

    The reader is the one the architecture declared at registration (ArchSpec.health);
    an architecture that declares none has no memory to check and gets {}.
    """
    arch = getattr(model.config, "arch", "")
    if arch not in HEALTH:
        return {}
    return HEALTH.get(arch)(traced_forward(model, ids))


def health_lines(health: dict[str, float]) -> list[str]:
    """The numbers as short readable lines (inspect printout, report)."""
    if not health:
        return []
    per_layer: dict[str, dict[str, float]] = {}
    flat = []
    for key, value in health.items():
        name = key.removeprefix("health_")
        stem, _, layer = name.rpartition("_l")
        if layer.isdigit():
            per_layer.setdefault(f"layer {layer}", {})[stem] = value
        else:
            flat.append(f"{name} {value:.3g}")
    lines = [f"{where}: " + ", ".join(f"{k} {v:.3g}" for k, v in vals.items())
             for where, vals in per_layer.items()]
    return lines + ([", ".join(flat)] if flat else [])


__all__ = ["health_lines", "memory_health"]
