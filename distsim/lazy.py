"""Names of a package imported from their modules on first use (PEP 562), so that importing the
package loads nothing heavy: how ``distsim`` (``open``) and ``distsim.stats`` stay light.

>>> import sys, types
>>> pkg = types.ModuleType("pkg"); sys.modules["pkg"] = pkg
>>> pkg.__getattr__, pkg.__dir__ = attach("pkg", {"sqrt": "math"})
>>> pkg.sqrt(9.0), "sqrt" in dir(pkg)
(3.0, True)
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def attach(package: str, modules: Mapping[str, str]
           ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for `package`: each name of `modules` (name -> the module that
    defines it) is imported from its module when first asked for, then kept on the package."""

    def __getattr__(name: str) -> Any:
        if name not in modules:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(modules[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *modules})

    return __getattr__, __dir__
