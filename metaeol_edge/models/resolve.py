"""The one resolver: a model reference (a registry id, a path, ollama:, lmstudio:, llamacpp:, hf:) -> a local file.

Everything that needs a model file comes through here: the embedder (and so the CLI, the
server, bulk jobs and the integrations, which build one), and the CLI's model commands.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from metaeol_edge.errors import ModelError
from metaeol_edge.models import digest, found, hub, registry, store
from metaeol_edge.models.modelfile import GGUFInfo, inspect_gguf
from metaeol_edge.models.quantization import QUANT_LEVELS, quantize_file
from metaeol_edge.models.store import Progress


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference made local: the file, its SHA-256 where known without hashing, its header's facts."""

    reference: str
    path: Path
    known_sha256: str | None
    info: GGUFInfo

    def sha256(self, memo: Callable[[Path], str] | None = None) -> str:
        """The file's identity: the known SHA-256, else hashed (through ``memo``, a cache's table, if given)."""
        return digest.fingerprint(self.path, self.known_sha256, memo)


def resolve(reference: str | os.PathLike[str], pull: bool = True, progress: Progress | None = None) -> ResolvedModel:
    """The one resolver: a registry id, a path, ``ollama:``/``lmstudio:``/``llamacpp:``/``hf:`` name -> a local model.

    A registry or hub model is pulled on first use (unless ``pull`` is False); its
    header is checked before llama.cpp ever sees the file.
    """
    path = resolve_model(reference, pull=pull, progress=progress)
    known = known_sha256(reference, path) or store.stamped_sha256(path)  # stamped: a pull's or a derived level's
    return ResolvedModel(os.fspath(reference), path, known, inspect_gguf(path))


def known_sha256(model: str | os.PathLike[str], path: Path) -> str | None:
    """A SHA-256 of ``path`` known without hashing it, or None.

    The registry's when ``path`` is the pulled file of registry id ``model``
    (checked at pull); else, for a model found on this machine or pulled from
    the hub, its blob's name or its pull's stamp; else one remembered from an
    earlier hash of the same path, size and modification time (``models list``).
    """
    if not looks_like_path(model):
        spec = registry.load_registry()[0].get(str(model))
        if spec is not None and path == registry.model_path(spec.id):
            return spec.sha256
    return found.known_sha256(os.fspath(model), path)


def quantized(
    model: str | os.PathLike[str],
    level: str,
    progress: Progress | None = None,
    *,
    source_sha256: str | None = None,
    announce: str | None = None,
) -> Path:
    """A model at another quantization level, written once into the store and reused.

    ``f32`` is the shipped file dequantized; every other level is quantized from
    that F32 file (as a ladder should be), not from the shipped quantization. The
    F32 file stays in the store only when it was asked for. ``source_sha256``:
    the shipped file's, when the caller knows it. ``announce``: printed to stderr
    before a file is written (once per model and level on a machine).
    """
    if level not in QUANT_LEVELS:
        raise ValueError(f"unknown quantization level {level!r}; known: {', '.join(QUANT_LEVELS)}")
    source = resolve_model(model, progress=progress)
    fingerprint = source_sha256 or digest.fingerprint(source, known_sha256(model, source))
    f32 = store.derived_path(source, fingerprint, "f32")
    target = store.derived_path(source, fingerprint, level)
    if target.is_file():
        return target
    if announce:
        print(announce, file=sys.stderr, flush=True)
    made_f32 = not f32.is_file()
    if made_f32:
        quantize_file(source, f32, "f32")
    if level != "f32":
        quantize_file(f32, target, level)
        if made_f32:
            f32.unlink(missing_ok=True)
    store._stamp(target, digest.sha256_file(target))  # its identity, known from now on without hashing
    return target


def looks_like_path(model: str | os.PathLike[str]) -> bool:
    s = os.fspath(model)
    if found.is_found_name(model):  # hf:OWNER/REPO/FILE.gguf has slashes and a .gguf, and is still a name
        return False
    return s.endswith(".gguf") or os.sep in s or "/" in s


def is_model_name(model: str | os.PathLike[str]) -> bool:
    """A registry id or a found/hub name (ollama:..., hf:...), as opposed to a path."""
    return found.is_found_name(model) or (not looks_like_path(model) and str(model) in registry.load_registry()[0])


def resolve_model(model: str | os.PathLike[str], pull: bool = True, progress: Progress | None = None) -> Path:
    """Turn a model id, a found model's name or a .gguf path into a file path, pulling if needed.

    ``hf:OWNER/REPO/FILE.gguf`` is pulled on first use like a registry id;
    ``ollama:``, ``lmstudio:`` and ``llamacpp:`` names are used where they lie.
    """
    if isinstance(model, str) and model.startswith("hf:"):
        return hub.resolve(model, pull=pull, progress=progress)
    if found.is_found_name(model):
        return found.resolve(str(model))
    if looks_like_path(model):
        path = Path(model).expanduser()
        if not path.is_file():
            raise ModelError(f"model file {path} does not exist")
        return path
    path = registry.model_path(str(model))
    if path.is_file():
        registry.check_pulled(str(model))
        return path
    if not pull:
        raise ModelError(f"model {model!r} is not pulled yet; run: metaeol models pull {model}")
    return registry.pull_model(str(model), progress=progress)
