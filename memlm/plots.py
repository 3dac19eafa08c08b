"""Plots shared by the trainer, `memlm compare` and the report (matplotlib, Agg).

A leaf module (it imports nothing from memlm), so the trainer can draw its curve
without depending on inspect/ or experiments/, which sit above it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_curves(history: Sequence[Mapping[str, Any]], path: str | Path,
                         title: str = "") -> Path:
    """Train and validation loss against step, one PNG."""
    train = [(r["step"], r["lm_loss"] if "lm_loss" in r else r["loss"])
             for r in history if r.get("kind") == "train"]
    val = [(r["step"], r["val_nll"]) for r in history if r.get("kind") == "val"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", lw=1.5, ms=3)
    return _save_step_axes(fig, ax, path, "cross-entropy (nats/token)", title or "training curve")


def plot_curve_overlay(curves: Mapping[str, Sequence[tuple[float, float]]], path: str | Path,
                       ylabel: str = "val loss", title: str = "") -> Path:
    """Several named (step, value) series on one axis (compare/report)."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name, pts in curves.items():
        if pts:
            ax.plot(*zip(*pts), "o-", label=name, ms=3, lw=1.4)
    return _save_step_axes(fig, ax, path, ylabel, title)


def _save_step_axes(fig: Any, ax: Any, path: str | Path, ylabel: str, title: str) -> Path:
    """Label a per-step plot the one way memlm's curves look, write it (folders made) and
    close the figure, so long runs that plot at every checkpoint do not accumulate figures."""
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
