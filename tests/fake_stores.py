"""Model folders as Ollama, LM Studio, llama.cpp and the Hugging Face cache lay them out, in a temporary HOME.

The real model comes in as links to the registry's smollm2 file (no 98 MB copy);
the other cases (encoders, projectors, split models, damaged blobs) are small
synthetic GGUF files written with the ``gguf`` package.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from metaeol_edge import registry

OLLAMA_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OLLAMA_CONFIG = "application/vnd.docker.container.image.v1+json"
HF_COMMIT = "ab810cf68114990406fdf996510dd3d3c6adbdf5"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_gguf(
    path: Path,
    arch: str = "llama",
    *,
    n_layer: int = 2,
    n_embd: int = 8,
    file_type: int | None = 15,  # Q4_K_M
    tensors: int = 4,
    split_max_tensors: int = 0,
    extra: dict[str, object] | None = None,
) -> list[Path]:
    """A tiny GGUF file (its header is a real model's shape; its weights are not); the files written."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    if arch != "clip":
        writer.add_uint32(f"{arch}.block_count", n_layer)
        writer.add_uint32(f"{arch}.embedding_length", n_embd)
        writer.add_uint32(f"{arch}.context_length", 256)
    if file_type is not None:
        writer.add_file_type(file_type)
    for key, value in (extra or {}).items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_string(key, str(value))
    for i in range(tensors):
        writer.add_tensor(f"blk.{i}.ffn_up.weight", np.full((16, 64), i, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if split_max_tensors:
        n = -(-tensors // split_max_tensors)
        return [path.with_name(f"{path.stem}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    return [path]


def link_registry_model(real: Path) -> Path:
    """The registry's smollm2 in the (temporary) store: a link to the real file, stamped as checked."""
    spec = registry.get_spec("smollm2-135m")
    target = registry.model_path("smollm2-135m")
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        target.symlink_to(real)
    registry._stamp(target, spec.sha256)
    return target


def ollama_model(root: Path, name: str, tag: str, blob_source: Path, *, sha: str | None = None, size=None) -> Path:
    """A model in an Ollama store: its manifest in Ollama's format, and its GGUF blob (a link to ``blob_source``)."""
    host, namespace, model = "registry.ollama.ai", "library", name
    if "/" in name:
        parts = name.split("/")
        host, namespace, model = parts if len(parts) == 3 else ("registry.ollama.ai", *parts)
    sha = sha or sha256(blob_source)
    blobs = root / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    blob = blobs / f"sha256-{sha}"
    if not blob.exists() and blob_source.exists():
        blob.symlink_to(blob_source)

    def small_blob(data: bytes) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / f"sha256-{digest}").write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    config = small_blob(json.dumps({"model_format": "gguf", "model_family": "llama"}).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": OLLAMA_MANIFEST,
        "config": {"mediaType": OLLAMA_CONFIG, **config},
        "layers": [
            {
                "mediaType": "application/vnd.ollama.image.model",
                "digest": f"sha256:{sha}",
                "size": size if size is not None else blob_source.stat().st_size,
            },
            {"mediaType": "application/vnd.ollama.image.template", **small_blob(b"{{ .Prompt }}")},
            {"mediaType": "application/vnd.ollama.image.params", **small_blob(b'{"stop": ["<|im_end|>"]}')},
        ],
    }
    path = root / "manifests" / host / namespace / model / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return blob


def hf_cached_file(hub_cache: Path, repo_id: str, file: str, source: Path, sha: str | None = None) -> Path:
    """A file in the Hugging Face cache as huggingface_hub leaves it: blob named by its SHA-256, snapshot link."""
    owner, repo = repo_id.split("/")
    repo_dir = hub_cache / f"models--{owner}--{repo}"
    blob = repo_dir / "blobs" / (sha or sha256(source))
    blob.parent.mkdir(parents=True, exist_ok=True)
    if not blob.exists():
        blob.symlink_to(source)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(HF_COMMIT)
    snap = repo_dir / "snapshots" / HF_COMMIT / file
    snap.parent.mkdir(parents=True, exist_ok=True)
    snap.symlink_to(Path("../" * (len(Path(file).parts) + 1)) / "blobs" / blob.name)
    return snap
