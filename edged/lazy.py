"""Deferred imports of modules that a library imports at its top but uses only on a path edged never takes.

paho-mqtt imports `urllib.request` (which brings http.client, email, tempfile and shutil) to read proxy
settings, and reads them only when PySocks is installed: about 2 MiB of RSS for a daemon that never asks.
A stand-in in `sys.modules` lets such an import succeed for free; the first attribute read imports the real
module, so a path that does use it still works as before. (importlib.util.LazyLoader does not help here:
CPython's import statement reads the module's `__spec__` when it is already in `sys.modules`, and that read
would load it at once.)
"""

from __future__ import annotations

import importlib
import sys
import types


def defer_import(name: str) -> None:
    """Let `import name` cost nothing until something reads an attribute of the module. No-op when the module
    is already imported (or deferred)."""
    if name in sys.modules:
        return
    stub = types.ModuleType(name, "stand-in until first use (edged.lazy.defer_import)")
    # The import statement checks __spec__._initializing of a module found in sys.modules: with None it reads
    # nothing else of the stand-in (an attribute read here would import the real module).
    stub.__spec__ = None

    def load(attr: str) -> object:
        if sys.modules.get(name) is stub:
            del sys.modules[name]  # importlib then imports the real module and rebinds the parent's attribute
        return getattr(importlib.import_module(name), attr)

    stub.__getattr__ = load  # type: ignore[method-assign]  # PEP 562: called for any attribute it lacks
    sys.modules[name] = stub
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(importlib.import_module(parent), child, stub)
