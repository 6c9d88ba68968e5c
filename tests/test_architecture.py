"""The floor plan: packages import only downwards and never in a circle, 0.2's imports still work,
and the one configuration agrees with ``MetaEOL``'s keywords."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from metaeol_edge import MetaEOL, _aliases
from metaeol_edge.core.config import EmbedConfig, decisive_options

REPO = Path(__file__).resolve().parents[1]


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.is_file():
        pytest.skip("import-linter is not installed: pip install -e '.[test]'")
    return subprocess.run([str(lint), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_layers_and_no_circles_hold():
    done = _lint_imports(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The check can fail: a copy of the package where the models import the embedder is refused."""
    copy = tmp_path / "repo"
    copy.mkdir()
    subprocess.run(["cp", "-r", str(REPO / "metaeol_edge"), str(REPO / "pyproject.toml"), str(copy)], check=True)
    digest = copy / "metaeol_edge" / "models" / "digest.py"
    digest.write_text(digest.read_text() + "\nfrom metaeol_edge.core import embedder  # noqa\n")
    env_path = f"{copy}"
    done = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"],
        cwd=copy,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode != 0
    assert "metaeol_edge.models.digest -> metaeol_edge.core.embedder" in done.stdout


@pytest.mark.parametrize("old", sorted(_aliases.MOVED))
def test_every_0_2_module_name_still_imports(old):
    module = importlib.import_module(f"metaeol_edge.{old}")
    targets = [importlib.import_module(f"metaeol_edge.{t}") for t in _aliases.MOVED[old]]
    if len(targets) == 1:
        assert module is targets[0]
        assert module.__spec__.name == targets[0].__name__  # the moved module keeps its own name
    else:
        for target in targets:
            public = [n for n in vars(target) if not n.startswith("_") and not inspect.ismodule(getattr(target, n))]
            for name in public:
                assert getattr(module, name) is not None


def test_0_2_imports_in_a_fresh_process():
    code = textwrap.dedent(
        """
        from metaeol_edge import MetaEOL
        from metaeol_edge.embedder import MetaEOL as M2
        from metaeol_edge.registry import resolve_model, pull_model, store_dir, get_spec
        from metaeol_edge.engine import Engine, QUANT_LEVELS, use_extra_bufts
        from metaeol_edge.reference import Reference, TorchBackend, DTYPES
        from metaeol_edge.naive import NaiveRecipe, NaiveBackend
        from metaeol_edge.identity import CacheKey, sha256_file, fingerprint
        from metaeol_edge.cache import EmbeddingCache
        from metaeol_edge.cli import main
        from metaeol_edge.bulk import embed_file, embed_dataset
        import metaeol_edge.server, metaeol_edge.integrations
        assert MetaEOL is M2
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.stdout.strip() == "ok", done.stderr


def test_a_patch_through_an_old_name_reaches_the_module_that_reads_it(monkeypatch):
    import metaeol_edge.registry as old

    from metaeol_edge.models import store

    real = store.home
    with monkeypatch.context() as patch:
        patch.setattr(old, "home", lambda: Path("/nowhere"))
        assert store.store_dir() == Path("/nowhere/models")
    assert store.home is real and old.home is real  # the undo reached it too


def test_the_configuration_holds_exactly_metaeols_keywords_and_defaults():
    params = {n: p for n, p in inspect.signature(MetaEOL.__init__).parameters.items() if n != "self"}
    fields = {f.name: f.default for f in dataclasses.fields(EmbedConfig)}
    assert set(params) == set(fields)
    for name, param in params.items():
        default = fields[name] if name != "backend_options" else None  # () in the frozen form
        assert param.default == default, name


def test_a_configuration_is_frozen_hashable_and_refuses_unknown_settings():
    config = EmbedConfig.of(model="m", layer=[-1, 3], backend_options={"lanes": 2})
    assert config.layer == (-1, 3) and config.backend_options == (("lanes", 2),)
    assert hash(config) == hash(EmbedConfig.of(model="m", layer=(-1, 3), backend_options={"lanes": 2}))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model = "other"  # type: ignore[misc]
    with pytest.raises(TypeError, match="unknown setting.*layers.*known:"):
        EmbedConfig.of(layers=3)
    assert config.kwargs()["backend_options"] == {"lanes": 2} and config.kwargs()["layer"] == [-1, 3]
    assert config.replace(n_threads=2).n_threads == 2 and config.n_threads is None


def test_a_0_2_job_identity_equals_the_configurations():
    """0.2's CLI stored only the options it passed; filled with defaults they name the same job."""
    stored = {"model": "smollm2-135m", "templates": None, "layer": None, "cache": True, "cache_dtype": "float32"}
    assert decisive_options(stored) == EmbedConfig.of(model="smollm2-135m").identity()
    assert decisive_options(stored) != EmbedConfig.of(model="smollm2-135m", max_length=64).identity()
    # speed-only settings never name another job; no cache means no rounding
    assert EmbedConfig.of(n_threads=3, verbose=True).identity() == EmbedConfig().identity()
    assert EmbedConfig.of(cache=False, cache_dtype="float16").identity() == EmbedConfig.of(cache=False).identity()


def test_metaeol_keeps_the_configuration_it_was_built_from(fake_model):
    model = MetaEOL(str(fake_model), "prompteol", backend="fake", cache=False, max_length=64)
    assert model.config == EmbedConfig.of(
        model=str(fake_model), templates="prompteol", backend="fake", cache=False, max_length=64
    )
    again = MetaEOL.from_config(model.config)
    assert (again.encode(["a cat"]) == model.encode(["a cat"])).all()
