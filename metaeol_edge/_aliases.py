"""0.2's module names, kept importable after the modules moved into packages by concern.

``import metaeol_edge.embedder`` (or ``from metaeol_edge.registry import resolve_model``)
still works: a name that moved whole is the moved module itself; a name whose
contents were split (``registry``, ``engine``, ``identity``, ``reference``, ``naive``)
is a view that looks each attribute up in the modules that now hold it. Nothing
here is imported by the package's own code, which uses the new names.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

PACKAGE = "metaeol_edge"

MOVED: dict[str, tuple[str, ...]] = {
    "registry": ("models.registry", "models.resolve", "models.store"),
    "found": ("models.found",),
    "hub": ("models.hub",),
    "modelfile": ("models.modelfile",),
    "quantization": ("models.quantization",),
    "prompts": ("methods.prompts",),
    "layers": ("methods.layers",),
    "engine": ("backends.engine", "backends.tensors", "llamacpp", "models.quantization"),
    "backends_fake": ("backends.fake",),
    "naive": ("backends.naive", "core.recipes"),
    "reference": ("backends.torch", "core.recipes"),
    "embedder": ("core.embedder",),
    "cache": ("core.cache",),
    "identity": ("core.identity", "models.digest"),
    "postprocess": ("core.postprocess",),
    "presets": ("core.presets",),
    "measurements": ("evaluation.measurements",),
    "cli": ("faces.cli",),
    "server": ("faces.server",),
    "bulk": ("faces.bulk",),
    "corpus": ("faces.corpus",),
    "integrations": ("faces.integrations",),
    "integrations.langchain": ("faces.integrations.langchain",),
    "integrations.llama_index": ("faces.integrations.llama_index",),
}
"""0.2 name (under ``metaeol_edge.``) -> the module(s) that hold its contents now, looked up in order."""


class _View(types.ModuleType):
    """A 0.2 module whose contents now live in several modules: reads and writes go to them."""

    def __init__(self, name: str, targets: list[types.ModuleType]) -> None:
        super().__init__(name, f"0.2's {name}: now {', '.join(t.__name__ for t in targets)}")
        object.__setattr__(self, "_targets", targets)
        object.__setattr__(self, "_replaced", {})

    def __getattr__(self, attr: str):
        for target in object.__getattribute__(self, "_targets"):
            if hasattr(target, attr):
                return getattr(target, attr)
        raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}")

    def __setattr__(self, attr: str, value) -> None:
        # monkeypatch.setattr(old_module, name, ...) must reach the module whose functions read it;
        # what it replaced is kept, so that deleting the name (monkeypatch's undo) puts it back.
        for target in object.__getattribute__(self, "_targets"):
            if hasattr(target, attr):
                object.__getattribute__(self, "_replaced").setdefault(attr, (target, getattr(target, attr)))
                setattr(target, attr, value)
                return
        object.__setattr__(self, attr, value)

    def __delattr__(self, attr: str) -> None:
        replaced = object.__getattribute__(self, "_replaced")
        if attr in replaced:
            target, value = replaced.pop(attr)
            setattr(target, attr, value)
        else:
            object.__delattr__(self, attr)

    def __dir__(self) -> list[str]:
        names = set(super().__dir__())
        for target in object.__getattribute__(self, "_targets"):
            names.update(dir(target))
        return sorted(names)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        old = fullname[len(PACKAGE) + 1 :] if fullname.startswith(PACKAGE + ".") else None
        if old not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=old == "integrations")

    def create_module(self, spec):
        targets = [importlib.import_module(f"{PACKAGE}.{t}") for t in MOVED[spec.name[len(PACKAGE) + 1 :]]]
        if len(targets) > 1:
            return _View(spec.name, targets)
        self._kept = getattr(targets[0], "__spec__", None)  # the import system overwrites it next
        return targets[0]

    def get_code(self, fullname: str):
        """The moved module's code, for ``python -m metaeol_edge.cli`` (runpy runs it as ``__main__``)."""
        real = f"{PACKAGE}.{MOVED[fullname[len(PACKAGE) + 1 :]][0]}"
        return importlib.util.find_spec(real).loader.get_code(real)

    def exec_module(self, module) -> None:
        if not isinstance(module, _View):
            module.__spec__ = self._kept  # the module keeps its own name and file for tools and pickles


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
