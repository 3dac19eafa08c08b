"""Name -> builder tables for architectures, tokenizers, datasets and tasks.

Components are looked up by name (as torchtitan does) so the CLI, YAML files
and the trainer never import a concrete architecture. Modules register
themselves on import; the first time a table is read, `_ensure_loaded` imports
every module of the packages that hold them, so `memlm.build("gmt")` works
without the caller importing `memlm.models.gmt`, and a new architecture needs
no edit to any shared file: dropping `memlm/models/NAME.py` is enough.

An architecture declares everything the rest of memlm needs to know about it
in its `register_arch` call (`ArchSpec`): its inspector and memory-health
reader for `memlm inspect` and the report, its tiny demo size, and its relative
training cost. The inspection functions live in a higher layer than the models
(memlm/inspect/), so the model file names them as "module:function" strings,
which `resolve` imports only when someone asks for them.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
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
    """An architecture: its config and model classes, and what the tools need to know of it."""

    name: str
    config_cls: type
    model_cls: type
    description: str = ""
    #: "module:function" printing what the memory did on a text (`memlm inspect`, the
    #: report): function(model, tokens, ids, output, out_dir, layer, graph) -> str.
    #: None: the architecture has no memory to inspect.
    inspector: str | None = None
    #: "module:function" giving the memory-health numbers (`health_*` floats) of a traced
    #: output (memlm/inspect/health.py): function(output) -> dict[str, float]
    health: str | None = None
    #: config overrides that make a tiny model of this architecture on the demo's shared
    #: backbone size (memory sizes, local windows); the demo adds nothing arch-specific
    tiny: Mapping[str, Any] = field(default_factory=dict)
    #: wall time of one training step relative to the dense GPT at the demo's tiny size and
    #: regime (benchmarks/arch_cost.py measures it); the demo starts the slowest first so
    #: its worker processes finish together
    cost: float = 1.0
    #: why the architecture keeps nothing from one segment for the next, if its memory works
    #: only inside the attention window; the demo then reports this reason, not a verdict
    window_only: str | None = None


def resolve(ref: str) -> Any:
    """The object a "package.module:name" reference names (imported on first use)."""
    module, _, attr = ref.partition(":")
    if not module or not attr:
        raise ValueError(f"{ref!r} is not a 'package.module:name' reference")
    return getattr(importlib.import_module(module), attr)


ARCHITECTURES: Registry[ArchSpec] = Registry("architecture", ("memlm.models",))
TOKENIZERS: Registry[Callable[..., Any]] = Registry(
    "tokenizer", ("memlm.data.tokenizers", "memlm.data.wordlevel"))
DATASETS: Registry[Callable[..., Any]] = Registry("dataset", ("memlm.data",))
class _Declared:
    """A read-only name -> function table over one "module:function" field of ArchSpec."""

    def __init__(self, kind: str, attr: str) -> None:
        self.kind, self.attr = kind, attr

    def names(self) -> list[str]:
        return [n for n in ARCHITECTURES.names() if getattr(ARCHITECTURES.get(n), self.attr)]

    def __contains__(self, name: str) -> bool:
        return name in ARCHITECTURES and getattr(ARCHITECTURES.get(name), self.attr) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> Callable[..., Any]:
        ref = getattr(ARCHITECTURES.get(name), self.attr)
        if ref is None:
            raise unknown_name(self.kind, name, self.names())
        return resolve(ref)


#: arch name -> function(model, tokens, ids, output, out_dir, layer, graph) -> printable text;
#: what `memlm inspect` shows for that architecture (declared as ArchSpec.inspector).
INSPECTORS = _Declared("inspector", "inspector")
#: arch name -> function(traced output) -> {"health_*": float} (declared as ArchSpec.health)
HEALTH = _Declared("memory-health reader", "health")


def register_arch(
    name: str,
    config_cls: type,
    description: str = "",
    *,
    inspector: str | None = None,
    health: str | None = None,
    tiny: Mapping[str, Any] | None = None,
    cost: float = 1.0,
    window_only: str | None = None,
) -> Callable[[type], type]:
    """Class decorator: `@register_arch("gpt", GPTConfig)` on the model class.

    The keyword arguments fill the `ArchSpec` fields of the same names.
    """
    if cost <= 0:
        raise ValueError(f"register_arch({name!r}): cost must be > 0, got {cost}")

    def deco(model_cls: type) -> type:
        ARCHITECTURES.add(name, ArchSpec(name, config_cls, model_cls, description,
                                         inspector=inspector, health=health,
                                         tiny=dict(tiny or {}), cost=float(cost),
                                         window_only=window_only))
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
