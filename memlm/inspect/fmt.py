"""Number formatting and intervals shared by the demo's tables and the HTML report."""

from __future__ import annotations

import math


def sig3(v: float | None, signed: bool = False) -> str:
    """`v` at 3 significant digits without an exponent: 0.785, 1.01, 19,700, -9,180.

    Tables a reader scans should not say ``1.964e+04 (-2.572e+04)``.
    """
    if v is None or not math.isfinite(v):
        return "n/a"
    sign = "+" if signed and v >= 0 else ""
    if v == 0:
        return sign + "0"
    v = float(f"{v:.3g}")  # round first, so 9.999 becomes 10.0, not 10.00
    decimals = 2 - math.floor(math.log10(abs(v)))
    if decimals > 0:
        return sign + f"{v:,.{decimals}f}"
    return sign + f"{round(v, decimals):,.0f}"


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n.

    Unlike the normal approximation p +- z sqrt(p(1-p)/n) it does not shrink to a
    point at 0% or 100%: 0 right of 50 still leaves up to 7% plausible.
    """
    if n <= 0:
        return float("nan"), float("nan")
    p = min(max(k / n, 0.0), 1.0)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


__all__ = ["sig3", "wilson"]
