"""GGUF language models already on this machine: Ollama, LM Studio, llama.cpp's cache, the Hugging Face cache.

Each becomes a :class:`FoundModel` whose ``name`` is what ``--model`` takes:

* ``ollama:NAME[:TAG]`` (``:latest`` when no tag is given). A manifest under
  ``$OLLAMA_MODELS/manifests/HOST/NAMESPACE/NAME/TAG`` (default
  ``~/.ollama/models``) lists the model's layers; the one of media type
  ``application/vnd.ollama.image.model`` is the GGUF file, ``blobs/sha256-<hex>``.
  It is used where it lies, read-only, never copied. Its name is its SHA-256
  (Ollama checked it when it pulled), so it serves as the model's fingerprint
  without hashing, once its size matches the manifest's: a blob that is missing
  or of another size is refused before llama.cpp sees it.
* ``lmstudio:PUBLISHER/REPO/FILE.gguf``: ``~/.lmstudio/models``, ``~/.cache/lm-studio/models``.
* ``llamacpp:FILE.gguf``: ``$LLAMA_CACHE`` or ``~/.cache/llama.cpp`` (what ``llama-cli -hf`` downloads).
* ``hf:OWNER/REPO/FILE.gguf``: the files ``metaeol models pull hf:...`` put in the
  store (:mod:`metaeol_edge.hub`), then the Hugging Face cache (``$HF_HUB_CACHE``,
  ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``), whose blobs are named by their
  SHA-256 too.

A split model (``X-00001-of-00003.gguf``) is one entry, named by its first part
(llama.cpp loads the others when given the first). Encoders (BERT-like, no causal
language-model head) and multimodal projectors are listed as not usable, with why.

The other files are hashed once for ``models list`` (the SHA-256 names a model's
cached vectors, so the same file found twice, or pulled from the hub, shares
them); the hash is remembered in ``$METAEOL_HOME/sha256.json`` by path, size and
modification time: a JSON file in the store, not the embedding cache, so that
listing models never depends on the cache being openable.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from metaeol_edge.errors import ModelError
from metaeol_edge.files import atomic_write
from metaeol_edge.models import digest, store
from metaeol_edge.models.modelfile import (
    SPLIT_NAME,
    info_from_header,
    quantization_name,
    read_header,
    split_paths,
    unusable_reason,
)

PREFIXES = ("ollama:", "lmstudio:", "llamacpp:", "hf:")
SOURCES = ("ollama", "lmstudio", "llama.cpp", "hf-pull", "hf-cache")  # in the order a name is looked up
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
OLLAMA_REGISTRY = "registry.ollama.ai"
OLLAMA_DIGEST = re.compile(r"sha256[:-]([0-9a-f]{64})")  # "sha256:<hex>" in manifests, "sha256-<hex>" blob names
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
MEMO_FILE = "sha256.json"


@dataclass(frozen=True)
class FoundModel:
    name: str  # what --model takes: ollama:qwen2.5:1.5b, lmstudio:..., hf:OWNER/REPO/FILE.gguf
    source: str  # one of SOURCES
    path: Path  # what llama.cpp is given: the file, or the first part of a split model
    parts: tuple[Path, ...]  # every file of the model
    size: int = 0  # bytes on disk, all parts
    sha256: str | None = None  # known without hashing (an Ollama or Hugging Face blob's name, a pull's stamp)
    architecture: str = ""
    quantization: str = ""
    n_layer: int | None = None
    n_embd: int | None = None
    usable: bool = True
    reason: str = ""  # why not usable


def is_found_name(model: str | os.PathLike[str]) -> bool:
    return isinstance(model, str) and model.startswith(PREFIXES)


# -- where to look --------------------------------------------------------------------


def locations(env: Mapping[str, str] | None = None, home: Path | None = None) -> dict[str, list[Path]]:
    """The folders each source keeps its models in, honouring the variables those tools read."""
    env = os.environ if env is None else env
    home = Path.home() if home is None else Path(home)

    def var(name: str) -> Path | None:
        value = env.get(name)
        return Path(value).expanduser() if value else None

    cache = var("XDG_CACHE_HOME") or home / ".cache"
    llama_cache, local_app_data, hf_home = var("LLAMA_CACHE"), var("LOCALAPPDATA"), var("HF_HOME")
    if llama_cache:
        llama = [llama_cache]
    else:  # llama.cpp's fs_get_cache_directory()
        llama = [cache / "llama.cpp"]
        if sys.platform == "darwin":
            llama.append(home / "Library" / "Caches" / "llama.cpp")
        if sys.platform == "win32" and local_app_data:
            llama.append(local_app_data / "llama.cpp")
    return {
        "ollama": [var("OLLAMA_MODELS") or home / ".ollama" / "models"],
        "lmstudio": [home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"],
        "llama.cpp": llama,
        "hf-pull": [hub_store()],
        "hf-cache": [var("HF_HUB_CACHE") or (hf_home / "hub" if hf_home else cache / "huggingface" / "hub")],
    }


def hub_store() -> Path:
    """Where ``metaeol models pull hf:OWNER/REPO/FILE`` keeps its files: ``store/hf/OWNER/REPO/FILE``."""
    return store.store_dir() / "hf"


# -- finding ----------------------------------------------------------------------------


def find_models(
    env: Mapping[str, str] | None = None,
    home: Path | None = None,
    *,
    sources: Iterable[str] = SOURCES,
    inspect: bool = True,
) -> list[FoundModel]:
    """Every GGUF model found in ``sources``; ``inspect`` reads each header (architecture, size, usable)."""
    where = locations(env, home)
    found: dict[str, FoundModel] = {}
    for source in sources:
        for root in where[source]:
            try:
                for model in _scan(source, root):
                    found.setdefault(model.name, model)  # the same name twice: the first source wins
            except OSError:  # a folder this user may not read: what it could read is kept
                continue
    models = list(found.values())
    return [describe(m) for m in models] if inspect else models


def _scan(source: str, root: Path) -> Iterator[FoundModel]:
    if source == "ollama":
        yield from _ollama(root)
    elif source in ("hf-cache", "hf-pull"):
        repos = _hf_cache_repos(root) if source == "hf-cache" else _hub_store_repos(root)
        for owner, repo, folders in repos:
            yield from _hf_repo(source, owner, repo, folders)
    else:
        prefix = "lmstudio:" if source == "lmstudio" else "llamacpp:"
        for first, parts in _grouped(_gguf_files(root)):
            yield FoundModel(f"{prefix}{first.relative_to(root).as_posix()}", source, first, parts, _size(parts))


def _gguf_files(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*.gguf") if not any(x.startswith(".") for x in p.relative_to(root).parts))


def _grouped(files: Iterable[Path]) -> Iterator[tuple[Path, tuple[Path, ...]]]:
    """(first part, all parts) for each model: the parts of a split model make one entry."""
    splits: dict[tuple[Path, str, str], None] = {}
    for f in files:
        m = SPLIT_NAME.match(f.name)
        if m is None:
            yield f, (f,)
        else:
            splits.setdefault((f.parent, m["prefix"], m["count"]), None)
    for parent, prefix, count in splits:
        parts = tuple(split_paths(parent / f"{prefix}-00001-of-{count}.gguf"))
        yield parts[0], parts


def _size(parts: Iterable[Path]) -> int:
    total = 0
    for p in parts:
        try:
            total += p.stat().st_size
        except OSError:
            pass
    return total


def describe(model: FoundModel) -> FoundModel:
    """Fill in what the GGUF header says, and whether MetaEOL can use the model (and why not)."""
    if not model.usable:
        return model  # a missing or truncated blob: its header is not worth reading
    try:
        meta, size = read_header(model.path)
    except ModelError as exc:
        return replace(model, usable=False, reason=_short(exc, model.path))
    arch = meta.get("general.architecture")
    arch = arch if isinstance(arch, str) else ""
    n_layer, n_embd = meta.get(f"{arch}.block_count"), meta.get(f"{arch}.embedding_length")
    described = replace(
        model,
        architecture=arch,
        quantization=quantization_name(meta.get("general.file_type")),
        n_layer=n_layer if isinstance(n_layer, int) else None,
        n_embd=n_embd if isinstance(n_embd, int) else None,
    )
    try:
        info_from_header(model.path, meta, size)  # the checks a run makes: split parts, encoders, projectors
    except ModelError as exc:
        return replace(described, usable=False, reason=unusable_reason(meta, model.path) or _short(exc, model.path))
    return described


def _short(exc: Exception, path: Path) -> str:
    message = str(exc)
    for prefix in (f"model file {path} ", f"{path} ", f"{path}: "):
        if message.startswith(prefix):
            return message[len(prefix) :]
    return message


# -- Ollama -------------------------------------------------------------------------------


def _ollama(root: Path) -> Iterator[FoundModel]:
    manifests = root / "manifests"
    if not manifests.is_dir():
        return
    for f in sorted(manifests.rglob("*")):
        parts = f.relative_to(manifests).parts
        if len(parts) == 4 and f.is_file() and not any(x.startswith(".") for x in parts):
            yield _ollama_entry(root, parts, f)  # type: ignore[arg-type]


def _ollama_short(parts: tuple[str, str, str, str]) -> str:
    """Ollama's own short name of a manifest's path: llama3.2:latest, user/model:tag, hf.co/owner/repo:tag."""
    host, namespace, model, tag = parts
    if host == OLLAMA_REGISTRY:
        return f"{model}:{tag}" if namespace == "library" else f"{namespace}/{model}:{tag}"
    return f"{host}/{namespace}/{model}:{tag}"


def ollama_manifest_parts(name: str) -> tuple[str, str, str, str] | None:
    """``llama3.2`` -> (registry.ollama.ai, library, llama3.2, latest): where Ollama keeps its manifest."""
    model, tag = name, "latest"
    if ":" in name.rsplit("/", 1)[-1]:
        model, tag = name.rsplit(":", 1)
    segments = model.split("/")
    if any(not s or s in (".", "..") or "\\" in s for s in [*segments, tag]):
        return None
    if len(segments) == 1:
        return OLLAMA_REGISTRY, "library", segments[0], tag
    if len(segments) == 2:
        return OLLAMA_REGISTRY, segments[0], segments[1], tag
    if len(segments) == 3:
        return segments[0], segments[1], segments[2], tag
    return None


def _ollama_entry(root: Path, parts: tuple[str, str, str, str], manifest: Path) -> FoundModel:
    short = _ollama_short(parts)
    name = f"ollama:{short}"

    def broken(reason: str, path: Path = manifest) -> FoundModel:
        return FoundModel(name, "ollama", path, (path,), usable=False, reason=reason)

    try:
        layers = json.loads(manifest.read_text(encoding="utf-8"))["layers"]
        layer = next(x for x in layers if isinstance(x, dict) and x.get("mediaType") == OLLAMA_MODEL_LAYER)
    except StopIteration:
        return broken("its manifest has no GGUF model layer (a cloud or adapter-only model?)")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return broken(f"its manifest {manifest} cannot be read: {exc}")
    digest = OLLAMA_DIGEST.fullmatch(str(layer.get("digest", "")))
    expected = layer.get("size")
    if digest is None or not isinstance(expected, int):
        return broken(f"its manifest {manifest} has no valid model digest and size")
    sha = digest[1]
    blob = root / "blobs" / f"sha256-{sha}"
    if not blob.exists() and (root / "blobs" / f"sha256:{sha}").exists():
        blob = root / "blobs" / f"sha256:{sha}"  # the name older Ollama releases used
    if not blob.is_file():
        return broken(f"its blob {blob} is missing (run: ollama pull {short})", blob)
    size = blob.stat().st_size
    if size != expected:
        what = "truncated" if size < expected else "damaged"
        return broken(
            f"its blob {blob} is {what}: {size} bytes, the manifest says {expected} (run: ollama pull {short})", blob
        )
    return FoundModel(name, "ollama", blob, (blob,), size, sha)


# -- the Hugging Face cache and hf: pulls ---------------------------------------------------


def _hf_cache_repos(root: Path, only: tuple[str, str] | None = None) -> Iterator[tuple[str, str, list[Path]]]:
    """(owner, repo, snapshot folders with refs/main's first) of each model repository in the cache."""
    if not root.is_dir():
        return
    dirs = [root / f"models--{only[0]}--{only[1]}"] if only else sorted(root.glob("models--*"))
    for repo_dir in dirs:
        owner_repo = repo_dir.name.removeprefix("models--").split("--", 1)
        snapshots = repo_dir / "snapshots"
        if len(owner_repo) != 2 or not snapshots.is_dir():
            continue
        try:
            main = (repo_dir / "refs" / "main").read_text(encoding="utf-8").strip()
        except OSError:
            main = ""
        folders = sorted(
            (d for d in snapshots.iterdir() if d.is_dir()), key=lambda d: (d.name != main, -d.stat().st_mtime)
        )
        yield owner_repo[0], owner_repo[1], folders


def _hub_store_repos(root: Path, only: tuple[str, str] | None = None) -> Iterator[tuple[str, str, list[Path]]]:
    if only:
        if (root / only[0] / only[1]).is_dir():
            yield only[0], only[1], [root / only[0] / only[1]]
        return
    if not root.is_dir():
        return
    for owner in sorted(d for d in root.iterdir() if d.is_dir()):
        for repo in sorted(d for d in owner.iterdir() if d.is_dir()):
            yield owner.name, repo.name, [repo]


def _hf_repo(source: str, owner: str, repo: str, folders: list[Path]) -> Iterator[FoundModel]:
    seen: set[str] = set()
    for folder in folders:  # a file in several snapshots: the newest (refs/main's) one
        for first, parts in _grouped(_gguf_files(folder)):
            rel = first.relative_to(folder).as_posix()
            if rel not in seen:
                seen.add(rel)
                known = [_known_part("hf:", p) for p in parts]
                sha = digest.split_sha256(known) if all(known) else None  # type: ignore[arg-type]
                yield FoundModel(f"hf:{owner}/{repo}/{rel}", source, first, parts, _size(parts), sha)


def hf_local(owner: str, repo: str, env: Mapping[str, str] | None = None, home: Path | None = None) -> list[FoundModel]:
    """The files of one Hugging Face repository on this machine: pulled into the store first, then cached."""
    where = locations(env, home)
    models: dict[str, FoundModel] = {}
    for source, scan in (("hf-pull", _hub_store_repos), ("hf-cache", _hf_cache_repos)):
        for root in where[source]:
            for o, r, folders in scan(root, (owner, repo)):
                for m in _hf_repo(source, o, r, folders):
                    models.setdefault(m.name, m)
    return list(models.values())


# -- a name -> its file --------------------------------------------------------------------


def lookup(name: str, env: Mapping[str, str] | None = None, home: Path | None = None) -> FoundModel:
    """The found model of that name (not ``hf:``: see :mod:`metaeol_edge.hub`); ModelError naming close ones."""
    if name.startswith("ollama:"):
        root = locations(env, home)["ollama"][0]
        parts = ollama_manifest_parts(name.removeprefix("ollama:"))
        manifest = root / "manifests" / Path(*parts) if parts else None
        if manifest is not None and manifest.is_file():
            return _ollama_entry(root, parts, manifest)  # type: ignore[arg-type]
        candidates = list(_ollama(root))
        wanted = f"ollama:{_ollama_short(parts)}" if parts else name
    else:
        source = {"lmstudio:": "lmstudio", "llamacpp:": "llama.cpp"}.get(name.split(":", 1)[0] + ":")
        if source is None:
            raise ModelError(f"{name!r} names no source of models; known: {', '.join(PREFIXES)}")
        candidates = find_models(env, home, sources=[source], inspect=False)
        wanted = name
    by_name = {m.name.lower(): m for m in candidates}  # Ollama's names ignore case
    if wanted.lower() in by_name:
        return by_name[wanted.lower()]
    raise ModelError(_not_found(name, wanted, [m.name for m in candidates]))


def _not_found(name: str, wanted: str, names: list[str]) -> str:
    def core(n: str) -> str:  # what tells models apart: no source prefix, no Ollama tag
        rest = n.split(":", 1)[-1].lower()
        return rest.rsplit(":", 1)[0] if n.startswith("ollama:") else rest

    by_core: dict[str, list[str]] = {}
    for n in names:
        by_core.setdefault(core(n), []).append(n)
    want = core(wanted)
    cores = difflib.get_close_matches(want, list(by_core), n=5, cutoff=0.6)
    cores += [c for c in by_core if want and (want in c or c in want) and c not in cores]
    close = [n for c in cores for n in by_core[c]][:5]
    message = f"no model {name!r} found on this machine"
    if close:
        return f"{message}; close: {', '.join(close)} (see: metaeol models list)"
    prefix = name.split(":", 1)[0]
    if names:
        return f"{message}; {prefix} has: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
    return f"{message}; {prefix} has no models here (see: metaeol models list)"


def resolve(name: str, env: Mapping[str, str] | None = None, home: Path | None = None) -> Path:
    """The file llama.cpp is given for a found name; ModelError if it is missing, truncated or unusable."""
    model = lookup(name, env, home)
    if not model.usable:
        raise ModelError(f"{model.name} cannot be used: {model.reason}")
    missing = [p for p in model.parts if not p.is_file()]
    if missing:
        raise ModelError(f"{model.name} cannot be used: {missing[0]} is missing")
    return model.path


# -- SHA-256s: known, remembered, or computed once ---------------------------------------------


def _known_part(name: str, path: Path) -> str | None:
    """A file's SHA-256 that needs no hashing: an Ollama or Hugging Face blob's name, a pull's stamp, the memo."""
    if name.startswith("ollama:") and path.parent.name == "blobs":
        m = OLLAMA_DIGEST.fullmatch(path.name)
        if m:
            return m[1]  # resolve() checked its size against the manifest
    if name.startswith("hf:") and path.is_symlink():
        blob = path.resolve()  # huggingface_hub names an LFS file's blob by its SHA-256
        if blob.parent.name == "blobs" and SHA256_HEX.fullmatch(blob.name):
            return blob.name
    return store.stamped_sha256(path) or memo_lookup(path)


def known_sha256(name: str, path: Path) -> str | None:
    """The SHA-256 (a split model: :func:`digest.split_sha256` of its parts') of ``path`` without hashing it."""
    shas = [_known_part(name, p) for p in split_paths(path)]
    return digest.split_sha256(shas) if all(shas) else None  # type: ignore[arg-type]


def model_sha256(model: FoundModel) -> str:
    """A found model's identity: known, remembered, or computed now (and remembered)."""
    if model.sha256:
        return model.sha256
    return digest.split_sha256([file_sha256(p) for p in model.parts])


def _memo_path() -> Path:
    return store.home() / MEMO_FILE


def _memo_load() -> dict[str, dict[str, object]]:
    try:
        data = json.loads(_memo_path().read_text(encoding="utf-8"))
        files = data["files"]
        return files if isinstance(files, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def memo_lookup(path: Path) -> str | None:
    """The remembered SHA-256 of a file whose path, size and modification time are as when it was hashed."""
    try:
        st = path.stat()
        key = str(path.resolve())
    except OSError:
        return None
    entry = _memo_load().get(key)
    if isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        sha = entry.get("sha256")
        return sha if isinstance(sha, str) and SHA256_HEX.fullmatch(sha) else None
    return None


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, computed once per (path, size, modification time) and remembered in the store."""
    remembered = memo_lookup(path)
    if remembered:
        return remembered
    before = path.stat()
    sha = digest.sha256_file(path)
    after = path.stat()
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
        return sha  # written to while hashed: not worth remembering
    files = _memo_load()
    # Forget files that are gone, so the memo does not grow with every temporary file ever hashed.
    files = {k: v for k, v in files.items() if Path(k).exists()}
    files[str(path.resolve())] = {"size": after.st_size, "mtime_ns": after.st_mtime_ns, "sha256": sha}
    try:
        with atomic_write(_memo_path()) as f:
            f.write(json.dumps({"version": 1, "files": files}, indent=1).encode("utf-8"))
    except OSError:
        pass  # a read-only store: the hash is just not remembered
    return sha
