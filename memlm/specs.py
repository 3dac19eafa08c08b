"""The small string grammars users type, in one place.

    parse_count("5M")            -> 5_000_000      (budgets, sizes: k, M, B/G)
    parse_counts("8,32,1k")      -> [8, 32, 1000]
    parse_length("4k")           -> 4000           (context lengths, as BABILong names them)
    parse_lengths("0k,1k,4k")    -> [0, 1000, 4000]
    length_name(4000)            -> "4k"
    parse_options(["chars=9"], {"chars": int}, spec) -> {"chars": 9}
    split_eval_tasks("ppl,babilong:qa1@0k,1k,zeroshot:piqa,hellaswag")
        -> ["ppl", "babilong:qa1@0k,1k", "zeroshot:piqa+hellaswag"]

'k' is always 1,000 (never 1,024), as in the BABILong paper and in token budgets. Every
parser fails with one line that shows an example of what it accepts.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from memlm.errors import ConfigError

_SCALE = {"": 1, "k": 1_000, "m": 1_000_000, "b": 1_000_000_000, "g": 1_000_000_000}


def parse_count(text: str | int | float) -> int:
    """'5M' -> 5_000_000, '20k' -> 20_000, '1.5B' -> 1_500_000_000, 1234 -> 1234."""
    if isinstance(text, (int, float)):
        return int(text)
    s = text.strip().lower()
    mult = _SCALE.get(s[-1:], 1)
    try:
        return int(float(s[:-1] if s[-1:] in "kmbg" else s) * mult)
    except ValueError as e:
        raise ConfigError(f"cannot read {text!r} as a count; use e.g. 5M, 200k or 1000000.") from e


def parse_counts(text: str | Sequence[int]) -> list[int]:
    """'8,32,1k' -> [8, 32, 1000]; a list of numbers passes through as ints."""
    if not isinstance(text, str):
        return [int(t) for t in text]
    return [parse_count(t) for t in text.split(",") if t.strip()]


def parse_length(text: str | int) -> int:
    """'4k' -> 4000, '1M' -> 1000000, '0k' -> 0, 512 -> 512 (a non-negative token count)."""
    if isinstance(text, numbers.Integral):  # numpy integers included
        value = int(text)
    else:
        s = str(text).strip()
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kKmM]?)", s)
        if not m:
            raise ConfigError(f"length {text!r} is not a token count; write e.g. 0k, 512, 4k, 1M.")
        value = round(float(m.group(1)) * _SCALE[m.group(2).lower()])
    if value < 0:
        raise ConfigError(f"length {text!r} is negative")
    return value


def parse_lengths(text: str | Sequence[str | int]) -> list[int]:
    """'0k,1k,4k' or ['0k', 1000] -> [0, 1000, 4000]."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return [parse_length(x) for x in items if str(x).strip()]


def length_name(n: int) -> str:
    """4000 -> '4k', 1000000 -> '1M', 700 -> '700' (the inverse of parse_length)."""
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def parse_options(items: Iterable[str], allowed: Mapping[str, Callable[[str], Any]], spec: str,
                  error: type[Exception] = ConfigError) -> dict[str, Any]:
    """KEY=VALUE items -> {key: allowed[key](value)}, refusing unknown keys and bad values.

    The one option grammar of data sources: `recall:chars=100000,seed=3` splits its
    items at commas, `babilong:qa1:window=256:segment=64` at colons; both come here.
    `spec` is the whole string, quoted in the error; `error` is the class raised.
    """
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in items)):
        key, eq, value = item.partition("=")
        if not eq or key not in allowed:
            raise error(f"bad option {item!r} in {spec!r}; options are KEY=VALUE with KEY in "
                        f"{', '.join(sorted(allowed))}.")
        try:
            out[key] = allowed[key](value)
        except ValueError as e:
            raise error(f"bad value in option {item!r} ({e}).") from e
    return out


def split_eval_tasks(spec: str) -> list[str]:
    """Split `memlm eval --tasks` at the commas that start a new task.

    A comma also separates a BABILong task's lengths (`babilong:qa1@0k,1k`) and
    zero-shot task names (`zeroshot:piqa,hellaswag`, joined with '+'), so a piece
    without ':' continues the previous task unless it is `ppl`.
    """
    parts: list[str] = []
    for piece in (p.strip() for p in spec.split(",")):
        if parts and ":" not in piece and piece != "ppl" and "@" in parts[-1]:
            parts[-1] += "," + piece  # a further length of a babilong task
        elif parts and ":" not in piece and piece != "ppl" and parts[-1].startswith("zeroshot:"):
            parts[-1] += "+" + piece
        else:
            parts.append(piece)
    return parts
