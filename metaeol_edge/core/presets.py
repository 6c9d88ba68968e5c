"""Presets: a measured configuration (templates, layer, post-processing) one option away.

The defaults stay paper-exact (MetaEOL's 8 templates, the final layer, no
post-processing). A preset names another configuration that issue 20's
benchmark (``benchmarks/quality.py``) chose on dev data and scored on the
test sets, and ships its post-processing fit for the models it was fitted on,
so ``MetaEOL(preset="quality")`` works offline with nothing to fit. For a
model without a shipped fit, or to fit on text of the user's own domain::

    metaeol fit-postprocess --preset quality --model MODEL --input CORPUS.txt

That fit is stored next to the model store and wins over the shipped one.

A preset may differ per model: ``models`` in the data names, by the model
file's SHA-256, the templates, layer or post-processing that model's own dev
run chose (qwen2.5-coder-1.5b is best without post-processing, for one).
:meth:`Preset.for_model` gives the configuration a file gets; any other file
gets the preset's own.

A preset changes when a dev run finds better settings, and each change is a
new revision. The revisions it replaced stay in the data (``earlier``) with
their fits, and ``quality@1`` names one: what was made with a revision (a
search collection stores ``quality@2``, not ``quality``) is remade the same way
after the preset moves on.

The presets are data: ``presets/presets.json`` at the top of the repository,
installed as package data beside the fits it names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from metaeol_edge.core.postprocess import parse_kind
from metaeol_edge.errors import MetaEOLError
from metaeol_edge.files import package_data
from metaeol_edge.methods.layers import LayerSpec


@dataclass(frozen=True)
class ShippedFit:
    """A fit that ships with a preset: for one model file (by SHA-256), made on text named in ``fit_on``."""

    file: str
    sha256: str
    fit_on: str


@dataclass(frozen=True)
class ModelChoice:
    """What one model file (by SHA-256) gets instead of the preset's own settings, and why (``chosen``)."""

    sha256: str
    chosen: str
    templates: str | None = None
    layer: LayerSpec | tuple[LayerSpec, ...] | None = None
    postprocess: str | None = None
    no_postprocess: bool = False  # the dev choice was the raw vectors
    combine_layers: bool | None = None  # None: the preset's own


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    templates: str
    layer: LayerSpec | tuple[LayerSpec, ...]  # a spec every model resolves (1.0: the last block's output); a
    # per-model choice may name that model's blocks, and several of them where ``combine_layers`` averages them
    postprocess: str | None  # None: no post-processing
    fits: dict[str, ShippedFit] = field(default_factory=dict)  # registry id -> its fit
    models: dict[str, ModelChoice] = field(default_factory=dict)  # registry id -> its own choice
    revision: int = 1
    earlier: dict[int, Preset] = field(default_factory=dict)  # the revisions this one replaced, by number
    current: bool = True  # False for a revision kept in ``earlier``
    combine_layers: bool = False  # ``layer`` lists several layers, averaged into one vector

    @property
    def pinned(self) -> str:
        """``quality@2``: this revision by name, which still means these settings once the preset moves on."""
        return f"{self.name}@{self.revision}"

    @property
    def label(self) -> str:
        """What messages call it: ``quality`` for the current revision, ``quality@1`` for an earlier one."""
        return self.name if self.current else self.pinned

    def for_model(self, fingerprint: str | None) -> Preset:
        """The preset as the model file with this SHA-256 gets it (its own choice, if it has one)."""
        for choice in self.models.values():
            if choice.sha256 == fingerprint:
                return replace(
                    self,
                    templates=choice.templates or self.templates,
                    layer=self.layer if choice.layer is None else choice.layer,
                    postprocess=None if choice.no_postprocess else choice.postprocess or self.postprocess,
                    combine_layers=self.combine_layers if choice.combine_layers is None else choice.combine_layers,
                )
        return self

    def shipped_fit(self, fingerprint: str) -> Path | None:
        """The shipped fit made for the model file with this SHA-256, if one ships."""
        folder = _data_dir()
        for fit in self.fits.values():
            if fit.sha256 == fingerprint and folder is not None:
                path = folder / fit.file
                if path.is_file():
                    return Path(str(path))
        return None


def _data_dir():
    return package_data("preset_data", "presets")


def _preset(name: str, p: dict, revision: int, earlier: dict[int, Preset], current: bool = True) -> Preset:
    fits = {model: ShippedFit(f["file"], f["sha256"], f["fit_on"]) for model, f in p.get("fits", {}).items()}
    models = {}
    for model, m in p.get("models", {}).items():
        models[model] = ModelChoice(
            m["sha256"],
            m["chosen"],
            m.get("templates"),
            None if m.get("layer") is None else _layer(m["layer"]),
            m.get("postprocess") or None,
            "postprocess" in m and m["postprocess"] is None,
            m.get("combine_layers"),
        )
    for kind in [p["postprocess"], *(m.postprocess for m in models.values())]:
        if kind is not None:
            parse_kind(kind)  # a typo in the data file fails here, not at the first encode
    made = Preset(name, p["description"], p["templates"], _layer(p["layer"]), p["postprocess"], fits, models,
                  revision, earlier, current, bool(p.get("combine_layers", False)))  # fmt: skip
    for own in [made, *(made.for_model(m.sha256) for m in models.values())]:
        _check_combination(own)
    return made


def _layer(spec: LayerSpec | list[LayerSpec]) -> LayerSpec | tuple[LayerSpec, ...]:
    """A layer from the data file; a list of them as a tuple, as a configuration holds it."""
    return tuple(spec) if isinstance(spec, list) else spec


def _check_combination(preset: Preset) -> None:
    """A combination needs two layers or more and no fit (a fit is per layer); a list of layers needs one."""
    many = isinstance(preset.layer, tuple)
    if preset.combine_layers and not (many and len(preset.layer) >= 2 and preset.postprocess is None):
        raise MetaEOLError(f"preset {preset.pinned!r}: combine_layers needs two or more layers and no post-processing")
    if many and not preset.combine_layers:
        raise MetaEOLError(f"preset {preset.pinned!r}: several layers need combine_layers (a preset gives one vector)")


def load_presets() -> dict[str, Preset]:
    """Each preset's current revision by name (its earlier ones in ``earlier``)."""
    folder = _data_dir()
    if folder is None or not (folder / "presets.json").is_file():
        return {}
    raw = json.loads((folder / "presets.json").read_text(encoding="utf-8"))
    presets = {}
    for name, p in raw["presets"].items():
        revision = int(p.get("revision", 1))
        earlier = {int(n): _preset(name, e, int(n), {}, current=False) for n, e in p.get("earlier", {}).items()}
        if any(not 1 <= n < revision for n in earlier):  # else an earlier one could stand in for the current
            raise MetaEOLError(f"preset {name!r}: earlier revisions must be 1..{revision - 1}, not {sorted(earlier)}")
        presets[name] = _preset(name, p, revision, earlier)
    return presets


def get_preset(name: str) -> Preset:
    """A preset by name: ``quality`` its current revision, ``quality@1`` that revision."""
    presets = load_presets()
    base, _, revision = name.partition("@")
    if base not in presets:
        known = ", ".join(sorted(presets)) or "none installed"
        raise MetaEOLError(f"unknown preset {base!r}; known: {known}")
    preset = presets[base]
    if base == name:
        return preset
    revisions = {preset.revision: preset} | preset.earlier
    if not (revision.isascii() and revision.isdecimal()) or int(revision) not in revisions:
        known = ", ".join(f"{base}@{n}" for n in sorted(revisions))
        raise MetaEOLError(f"preset {base!r} has no revision {revision!r}; known: {known}")
    return revisions[int(revision)]
