"""Public names a package imports on first use (PEP 562), so that ``import posterior`` (and the
command line's argument checks) never load torch, transformers or numpy-heavy modules:

    __getattr__, __dir__ = lazy_names(__name__, {"Posterior": "posterior.posterior", ...})

Each name maps to the module that defines it; the first ``package.Name`` imports that module and
keeps the value in the package's namespace (later lookups are plain attribute reads). A name not
in the table that is a submodule of the package (``posterior.samplers``, ``posterior.testing``)
is imported the same way, as it was reachable when the package imported everything eagerly.

Some public names are named like the submodule that defines them: ``posterior.compare`` and
``posterior.generate`` are functions, and so is ``posterior.twists.learned``. Python binds a
submodule to its package's attribute when something first imports it (``from
posterior.compare.report import ...``); the package keeps the table's value there instead, as it
did when its ``__init__`` imported the function eagerly.
"""

from __future__ import annotations

import importlib
import sys
import types


def lazy_names(package: str, names: dict[str, str]):
    """``(__getattr__, __dir__)`` for the module ``package`` (see the module docstring)."""

    def __getattr__(name: str):
        module_name = names.get(name)
        if module_name is not None:
            value = getattr(importlib.import_module(module_name), name)
        elif name.startswith("__"):  # probes such as __wrapped__ or __path__ are not submodules
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        else:
            try:
                value = importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as e:
                if e.name != f"{package}.{name}":  # the submodule exists but something it imports does not
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        namespace = vars(sys.modules[package])
        return sorted(set(namespace) | set(names) | set(namespace.get("__all__", ())))

    class Package(types.ModuleType):
        def __setattr__(self, name, value):
            if isinstance(value, types.ModuleType) and name in names and value.__name__ == f"{package}.{name}":
                return  # a submodule named like a public name: the public name stays
            super().__setattr__(name, value)

    sys.modules[package].__class__ = Package
    return __getattr__, __dir__


__all__ = ["lazy_names"]
