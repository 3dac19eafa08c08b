"""Shared fixtures: paths to ../shared/data (skipped with a reason when absent)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEMLM_SHARED_DATA", REPO.parent / "shared" / "data"))


def load_script(relpath: str) -> ModuleType:
    """A script of the repo (benchmarks/, tools/) imported as a module by its path: they are
    not a package, and each test needs a fresh copy it may patch."""
    path = REPO / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test saying what is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (tests read ../shared/data beside the checkout)")
    return path


# Tests use tiny models: one intra-op thread is as fast or faster, and much faster when the
# machine is busy (thread oversubscription costs 5-20x on 2 cores).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts on one thread, whatever a test before it set (a benchmark's
    --threads, a timing test), and the count in force before it comes back after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def babi_dir():
    """The bAbI v1.2 folder under ../shared/data, or skip."""
    return shared_path("babi")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
