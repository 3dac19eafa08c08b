"""Name -> builder tables for architectures, tokenizers, datasets and tasks.

Components are looked up by name (as torchtitan does) so the CLI, YAML files
and the trainer never import a concrete architecture. Modules register
themselves on import; the first time a table is read, `_ensure_loaded` imports
every module of the packages that hold them, so `memlm.build("gmt")` works
without the caller importing `memlm.models.gmt`, and a new architecture needs
no edit to any shared file: dropping `memlm/models/NAME.py` is enough.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from memlm.errors import unknown_name

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, packages: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self._packages = packages
        self._loaded = False
        self._items: dict[str, T] = {}

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self._loaded = True
            for package in self._packages:
                pkg = importlib.import_module(package)
                # a plain module (e.g. memlm.data.tokenizers) registers itself on import
                for info in pkgutil.iter_modules(getattr(pkg, "__path__", []), prefix=f"{package}."):
                    importlib.import_module(info.name)

    def add(self, name: str, item: T) -> T:
        if name in self._items and self._items[name] is not item:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item
        return item

    def register(self, name: str) -> Callable[[T], T]:
        def deco(item: T) -> T:
            return self.add(name, item)

        return deco

    def get(self, name: str) -> T:
        self._ensure_loaded()
        if name not in self._items:
            raise unknown_name(self.kind, name, self._items)
        return self._items[name]

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._ensure_loaded()
        return name in self._items


@dataclass(frozen=True)
class ArchSpec:
    """An architecture: its typed config class and its model class."""

    name: str
    config_cls: type
    model_cls: type
    description: str = ""


ARCHITECTURES: Registry[ArchSpec] = Registry("architecture", ("memlm.models",))
TOKENIZERS: Registry[Callable[..., Any]] = Registry(
    "tokenizer", ("memlm.data.tokenizers", "memlm.data.wordlevel"))
DATASETS: Registry[Callable[..., Any]] = Registry("dataset", ("memlm.data",))
#: arch name -> function(model, tokens, ids, output, out_dir, layer, graph) -> printable text;
#: what `memlm inspect` shows for that architecture (see memlm/inspect/).
INSPECTORS: Registry[Callable[..., str]] = Registry("inspector", ("memlm.inspect",))


def register_arch(name: str, config_cls: type, description: str = "") -> Callable[[type], type]:
    """Class decorator: `@register_arch("gpt", GPTConfig)` on the model class."""

    def deco(model_cls: type) -> type:
        ARCHITECTURES.add(name, ArchSpec(name, config_cls, model_cls, description))
        return model_cls

    return deco


def build(name: str, **overrides: Any) -> Any:
    """Build architecture `name` with config overrides (the shared size vocabulary).

    Lives here, not only in memlm/__init__.py, so the trainer and experiments build
    models through the registry without importing the package's public front.
    """
    spec = ARCHITECTURES.get(name)
    config = spec.config_cls.from_dict({**overrides, "arch": name}, where=f"build({name!r})")
    return spec.model_cls(config)


def build_from_config(config: Any) -> Any:
    """Build a model from a `ModelConfig` (or subclass) instance."""
    return ARCHITECTURES.get(config.arch).model_cls(config)
