"""Moved to memlm/plots.py (the trainer draws its curve with it, and the trainer sits below
inspect/); this name stays importable for code written before the move."""

from memlm.plots import plot_curve_overlay, plot_training_curves, plt  # noqa: F401
