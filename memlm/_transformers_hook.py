"""Register memlm with transformers' Auto classes as soon as transformers is imported.

`import memlm` must make `AutoModelForCausalLM.from_pretrained(folder)` work
for memlm folders, but importing transformers' model machinery takes seconds
and most memlm work (training, the CLI) never touches it. So `import memlm`
only calls `install()`:

- transformers already imported: memlm/hf/ is imported now (it registers);
- transformers not imported yet: a one-shot import hook waits for it and
  registers right after transformers' own package has run;
- transformers not installed: nothing happens, and `import memlm` still works.

A failure while registering is turned into a warning: it must never break the
caller's `import transformers`.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType


def _register() -> None:
    try:
        import memlm.hf  # noqa: F401  (registers on import)
    except Exception as e:  # an incompatible transformers must not break the caller
        warnings.warn(
            f"memlm could not register its transformers classes ({type(e).__name__}: {e}); "
            "AutoModelForCausalLM will not know model_type 'memlm'. Import memlm.hf to see why.",
            stacklevel=2,
        )


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of `transformers` to register after it."""

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)  # one shot, and the lookup below must not find us again
        spec = importlib.util.find_spec("transformers")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_package = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run_package(module)
            _register()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Register now if transformers is loaded, else when it gets imported."""
    if "transformers" in sys.modules:
        if sys.modules["transformers"] is not None:  # None: imports of it are blocked
            _register()
        return
    if any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        return
    if importlib.util.find_spec("transformers") is not None:
        sys.meta_path.insert(0, _RegisterAfterImport())
