"""Errors raised by memlm.

Every error names the bad value and says how to fix it. They all derive from
`MemlmError` so a caller (the CLI, a notebook) can catch memlm's own problems
without swallowing real bugs. Each also derives from the builtin exception a
Python user would expect (`ValueError`, `FileNotFoundError`, ...).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MemlmError(Exception):
    """Base class of every error memlm raises on purpose."""


class ConfigError(MemlmError, ValueError):
    """A configuration value or key is wrong."""


class UnknownNameError(MemlmError, KeyError):
    """A name (architecture, tokenizer, dataset, task, config key) is not known."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class DataError(MemlmError, ValueError):
    """Input data is missing, empty, binary or otherwise unusable."""


class CheckpointError(MemlmError, ValueError):
    """A checkpoint is missing, corrupt, truncated or does not match."""


class TokenizerMismatchError(CheckpointError):
    """The tokenizer does not match the model's vocabulary."""


class SequenceTooLongError(MemlmError, ValueError):
    """A sequence is longer than the model's context."""


class RunExistsError(MemlmError, FileExistsError):
    """The output folder already holds a different run."""


class TrainingDivergedError(MemlmError, RuntimeError):
    """The loss became NaN or infinite."""


class MissingDependencyError(MemlmError, ImportError):
    """An optional dependency (an extra such as `[eval]`) is not installed."""


def closest(name: str, choices: Iterable[str]) -> str:
    """A 'did you mean' suffix for `name` among `choices` ('' when nothing is close)."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" Did you mean {match[0]!r}?" if match else ""


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> UnknownNameError:
    """Build the error for an unknown `kind` called `name`, listing the valid ones."""
    choices = sorted(choices)
    return UnknownNameError(
        f"unknown {kind} {name!r}.{closest(name, choices)} Valid {kind}s: {', '.join(choices)}."
    )
