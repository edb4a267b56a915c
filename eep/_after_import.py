"""Run a function once a module has been imported (a post-import hook), without importing it.

`eep/__init__.py` registers eep's model classes with transformers this way, so that
`import eep.search` (or the config, or the dashboard) does not pay for importing transformers.

The function runs at the first moment when `trigger` is imported and no module under
`package` is half-initialised: the registration imports eep modules, and running it while
one of them is mid-import (the one whose import pulled in transformers) would meet that module
half-built. So the hook also wraps the loaders of `package`'s modules and checks again each
time one of them finishes.
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Callable


class _AfterImport(importlib.abc.MetaPathFinder):
    """Wraps the loaders of `trigger` and of `package`'s modules; fires `callback` once."""

    def __init__(self, trigger: str, package: str, callback: Callable[[], None]) -> None:
        self.trigger, self.package, self.callback = trigger, package, callback
        self._searching = False

    def find_spec(self, fullname, path, target=None):
        """The spec the other finders give, its loader wrapped; None for unwatched modules."""
        watched = fullname == self.trigger or fullname.startswith(self.package + ".")
        if not watched or self._searching:
            return None
        self._searching = True
        try:
            spec = None
            for finder in list(sys.meta_path):
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._searching = False
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        # Patched on this spec's own loader object (a fresh one per spec): a spec that is only
        # looked up (importlib.util.find_spec, to test for a package) is never executed.
        exec_module = loader.exec_module

        def exec_then_check(module) -> None:
            exec_module(module)
            self._fire_if_ready(module.__name__)

        loader.exec_module = exec_then_check
        return spec

    def _fire_if_ready(self, finished: str) -> None:
        if self not in sys.meta_path or self.trigger not in sys.modules:
            return
        prefix = self.package + "."
        for name, module in list(sys.modules.items()):
            # `finished` has run its code; importlib clears its flag only after we return.
            if name == finished or not (name == self.package or name.startswith(prefix)):
                continue
            if _initializing(module):
                return
        sys.meta_path.remove(self)
        self.callback()


def _initializing(module: object) -> bool:
    # importlib marks a module's spec `_initializing` while its code runs.
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def call_after_import(trigger: str, package: str, callback: Callable[[], None]) -> None:
    """Call `callback()` once, after `trigger` is imported and no `package` module is mid-import."""
    sys.meta_path.insert(0, _AfterImport(trigger, package, callback))
